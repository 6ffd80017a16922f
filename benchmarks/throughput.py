"""Training throughput on the machine it runs on, one JSON line per measurement.

    python benchmarks/throughput.py                     # CPU size here, GPU size when CUDA is present
    python benchmarks/throughput.py --size gpu          # ResNet-50, 224 px, bf16 autocast, channels_last
    python benchmarks/throughput.py --tiny --losses softtriple   # smoke-test size (seconds, not figures)

It measures, in one run:
  backbone    bare forward+backward+optimizer step on synthetic tensors already on the device,
              at each loss's batch size (what the hardware gives the model alone);
  input       the project's input pipeline alone (benchmarks/input_pipeline.py's measurement);
  train       end-to-end training images/s with each seed loss through the real path (Ray Train,
              Ray Data planned batches, refresh actor), as rank 0 logged it to MLflow;
  peer        the same backbone and loss with pytorch-metric-learning (PML) and a plain torch
              DataLoader over the same images (PML has SoftTriple, TripletMargin and
              NormalizedSoftmax; it has no Magnet or PDDM, so those have no peer), and ours/peer;
  decode      JPEG decode (+ random resized crop to 224 px) images/s on one core, at the
              converters' 256 px short side against full-size images; on CUDA also torchvision's
              batched GPU decode (decode_jpeg on the device). `--decode-only` runs just this.

Sizes: `cpu` is the `local` preset (tiny_cnn, 48 px, 2 DDP workers); `gpu` is the `gpu` preset
(ResNet-50, 224 px, bf16 autocast, channels_last) with one worker per visible GPU, on the
built-in dataset drawn at 256 px (like storage pre-resized to a 256 px short side).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from input_pipeline import measure_input_pipeline, measure_training  # noqa: E402

SEED_LOSSES = ("magnet", "pddm", "softtriple")
PML_PEERS = ("softtriple", "triplet", "normalized_softmax")
"""Losses of ours that PML also has (it has no Magnet or PDDM)."""

# One GPU: the worker holds 0.9 of it and the refresh actor 0.1, so the actor re-embeds on the
# GPU beside training (on CPU cores ResNet-50 would take minutes per pass); its 3 CPUs feed it
# (16 = 4 for the worker + 8 decode actors + 3 + eval decode).
GPU_REFRESH = ["train.gpus_per_worker=0.9", "refresh.num_gpus=0.1", "refresh.num_cpus=3",
               "refresh.max_plan_ahead_steps=10"]

# Per loss and size: the preset and the overrides that make the loss trainable there. The
# Magnet and PDDM CPU presets are the ones users run; on GPU their batches are sized to the
# gpu preset's 128 images per rank.
LOSS_CONFIGS = {
    "cpu": {
        "magnet": ("magnet", ["data.seen_holdout_fraction=0.0"]),
        "pddm": ("pddm", []),
        "softtriple": ("local", ["loss.name=softtriple"]),
        "triplet": ("local", []),
        "normalized_softmax": ("local", ["loss.name=normalized_softmax"]),
    },
    "gpu": {
        "magnet": ("gpu", ["loss.name=magnet", "sampler.name=neighbourhoods",
                           "loss.magnet.clusters_per_neighbourhood=8", "loss.magnet.examples_per_cluster=4",
                           "loss.magnet.neighbourhoods_per_rank=4", *GPU_REFRESH]),
        "pddm": ("gpu", ["loss.name=pddm", "sampler.name=hard_pools", "sampler.classes_per_batch=16",
                         "sampler.samples_per_class=4", "sampler.pool_draws_per_class=4",
                         "loss.pddm.quadruplets=per_positive_pair", "loss.pddm.negatives=semi_hard",
                         *GPU_REFRESH]),
        "softtriple": ("gpu", ["loss.name=softtriple"]),
        "triplet": ("gpu", []),
        "normalized_softmax": ("gpu", ["loss.name=normalized_softmax"]),
    },
}

SIZE_OVERRIDES = {
    "cpu": ["train.epochs=2"],
    # 256 px source images; a worker per GPU; the refresh actor shares the GPU (a fraction).
    "gpu": ["train.epochs=3", "data.synthetic.image_size=256"],
}
TINY_OVERRIDES = [
    "data.synthetic.num_classes=16", "data.synthetic.images_per_class=16", "data.synthetic.image_size=32",
    "data.image_size=32", "data.eval_resize=36", "train.epochs=2", "train.log_every_steps=2",
    "sampler.classes_per_batch=4", "loss.magnet.clusters_per_class=2", "loss.magnet.clusters_per_neighbourhood=4",
]


def loss_config(size: str, loss: str, extra: list[str], storage: str):
    """The validated config of one end-to-end run."""
    from pipeline.config import load_config

    preset, overrides = LOSS_CONFIGS[size][loss]
    workers = [f"train.num_workers={max(1, torch.cuda.device_count())}"] if size == "gpu" else []
    return load_config(preset, [
        *overrides, *SIZE_OVERRIDES[size], *workers, "eval.every_epochs=1000", "train.max_failures=0",
        f"train.storage_path={storage}/{loss}", f"train.run_name=throughput-{size}-{loss}", *extra,
    ])


def _finite(value: float, digits: int) -> float | None:
    """Rounded, or None when a run logged too few intervals to give the figure (NaN)."""
    return None if value != value else round(value, digits)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _compute_settings(config, device: torch.device):
    """(autocast dtype or None, channels_last?) as the training loop sets them."""
    autocast = torch.bfloat16 if device.type == "cuda" else None
    return autocast, device.type == "cuda" and config.model.channels_last


def bare_backbone(config, batch_size: int, device: torch.device, steps: int) -> dict:
    """Forward + backward + AdamW step of the configured embedding network on device tensors."""
    from pipeline.models import build_model

    autocast, channels_last = _compute_settings(config, device)
    torch.manual_seed(0)
    model = build_model(config.model).to(device)
    size = config.data.image_size
    images = torch.rand(batch_size, 3, size, size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            embeddings = model(images)
        loss = embeddings.float().square().sum()  # a scalar through every weight; no metric loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"backbone": config.model.backbone, "image_size": size, "batch_size": batch_size,
            "device": device.type, "bf16": autocast is not None, "channels_last": channels_last,
            "steps": steps, "images_per_s": round(batch_size * steps / seconds, 1)}


class ParquetImages(torch.utils.data.Dataset):
    """A split's images straight from its Parquet shards, decoded and augmented per item the
    way a plain PyTorch project would (torchvision decode, RandomResizedCrop, flip)."""

    def __init__(self, root: str, split: str, image_size: int, crop_scale_min: float):
        import pyarrow.parquet as pq

        from pipeline.data.format import shard_uris
        from pipeline.storage import filesystem_for

        tables = []
        for uri in shard_uris(root, split):
            fs, path = filesystem_for(uri)
            tables.append(pq.read_table(path, filesystem=fs, columns=["label", "image"]))
        self.images = [b for t in tables for b in t.column("image").to_pylist()]
        raw = np.concatenate([t.column("label").to_numpy() for t in tables])
        _, self.labels = np.unique(raw, return_inverse=True)
        self.image_size, self.crop_scale_min = image_size, crop_scale_min
        self.transform = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from pipeline.data.decoding import decode_rgb, train_transform

        if self.transform is None:  # built in the loader worker
            self.transform = train_transform(self.image_size, self.crop_scale_min)
        return self.transform(decode_rgb(self.images[i])), int(self.labels[i])


def pml_loss(name: str, config, num_classes: int):
    """PML's version of our loss with our settings."""
    from pytorch_metric_learning import losses, miners, regularizers

    dim = config.model.embedding_dim
    if name == "softtriple":
        s = config.loss.softtriple
        return losses.SoftTripleLoss(
            num_classes, dim, centers_per_class=s.centers_per_class, la=s.la, gamma=s.gamma,
            margin=s.margin, weight_regularizer=regularizers.SparseCentersRegularizer(num_classes, s.centers_per_class),
            weight_reg_weight=s.tau,
        ), None
    if name == "triplet":
        return (losses.TripletMarginLoss(margin=config.loss.triplet.margin),
                miners.TripletMarginMiner(margin=config.loss.triplet.margin, type_of_triplets="semihard"))
    if name == "normalized_softmax":
        return losses.NormalizedSoftmaxLoss(num_classes, dim, temperature=config.loss.normalized_softmax.temperature), None
    raise ValueError(f"PML has no {name} loss")


def peer_training(name: str, config, root: str, device: torch.device, steps: int, workers: int) -> dict:
    """PML loss + plain DataLoader (PML's MPerClassSampler) + our EmbeddingNet, one process."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    from pipeline.models import build_model
    from pipeline.training.optim import build_optimizer

    autocast, channels_last = _compute_settings(config, device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, round(config.train.num_workers * config.train.torch_threads)))
    data = ParquetImages(root, config.data.train_split, config.data.image_size, config.data.crop_scale_min)
    batch = config.global_batch_size
    sampler = MPerClassSampler(data.labels, m=config.sampler.samples_per_class, batch_size=batch,
                               length_before_new_iter=batch * (steps + 2))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn, miner = pml_loss(name, config, int(data.labels.max()) + 1)
    loss_fn = loss_fn.to(device)
    optimizer = build_optimizer(model, loss_fn, config.optim, config.loss.lr)
    every = config.train.log_every_steps
    rates, done, window_start = [], 0, time.perf_counter()
    for images, labels in loader:
        images = images.to(device, non_blocking=True).float().div_(255)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            embeddings = model(images)
        embeddings = embeddings.float()
        loss = loss_fn(embeddings, labels, miner(embeddings, labels)) if miner else loss_fn(embeddings, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += 1
        if done % every == 0:
            loss.item()  # the same synchronisation point as our logging window
            now = time.perf_counter()
            rates.append(every * batch / (now - window_start))
            window_start = now
        if done >= steps:
            break
    rates = rates[1:] or rates  # the first interval holds the loader's start-up, as in ours
    return {"loss": name, "library": "pytorch-metric-learning", "batch_size": batch, "steps": done,
            "loader_workers": workers, "images_per_s": round(statistics.median(rates), 1) if rates else None}


def textured_jpeg(width: int, height: int, seed: int, quality: int = 95) -> bytes:
    """A photo-like JPEG: smooth random colour fields, edges and sensor noise (real photos
    decode at about this cost per pixel; flat synthetic drawings would decode faster)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = 40 * np.sin(xx / rng.uniform(3, 12) + yy / rng.uniform(3, 12))[..., None]
    pixels = np.clip(base + stripes + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_decode(sizes: list[tuple[int, int]], count: int, image_size: int, device: torch.device) -> list[dict]:
    """Decode (and decode + train augmentation) images/s on one CPU thread, full-size JPEGs
    against the same JPEGs stored at a 256 px short side by the converters' encoder; on CUDA
    also torchvision.io.decode_jpeg on the device, batched."""
    from torchvision.io import decode_jpeg

    from pipeline.data.convert.encoding import EncodeOptions, encode_jpeg
    from pipeline.data.decoding import decode_rgb, train_transform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transform = train_transform(image_size, 0.16)
    rows = []
    for width, height in sizes:
        full = [textured_jpeg(width, height, seed) for seed in range(count)]
        stored = {"full": full, "short_side_256": [encode_jpeg(b, EncodeOptions(short_side=256))[0] for b in full]}
        for storage, images in stored.items():
            row = {"source": f"{width}x{height}", "storage": storage,
                   "mean_kib": round(sum(map(len, images)) / len(images) / 1024, 1)}
            for label, fn in (("decode", decode_rgb), ("decode_crop", lambda b: transform(decode_rgb(b)))):
                fn(images[0])
                start, cpu_start = time.perf_counter(), time.process_time()
                for b in images:
                    fn(b)
                # One thread: images per CPU-second is the per-core rate, and unlike the wall
                # rate it holds on a machine other processes are loading.
                row[f"cpu_{label}_images_per_cpu_s"] = round(len(images) / (time.process_time() - cpu_start), 1)
                row[f"cpu_{label}_images_per_s_wall"] = round(len(images) / (time.perf_counter() - start), 1)
            if device.type == "cuda":
                tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]
                decode_jpeg(tensors[:8], device=device)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for i in range(0, len(tensors), 128):
                    decode_jpeg(tensors[i:i + 128], device=device)
                torch.cuda.synchronize()
                row["gpu_decode_images_per_s"] = round(len(tensors) / (time.perf_counter() - start), 1)
            rows.append(row)
            print(json.dumps({"decode": row}), flush=True)
    torch.set_num_threads(threads)
    return rows


def shutdown_ray(timeout_s: float = 60.0) -> None:
    """`ray.shutdown()`, then wait (at most `timeout_s`) until the processes of the local cluster
    it ends have exited, so that the next measurement's cluster starts on a quiet machine.

    Once (the smoke test in CI at 6f9bd4b, the only time in this project's runs) the raylet of
    the cluster started right after a shutdown was SIGKILLed within seconds, while the old
    cluster's dashboard was still exiting, and the run died ("The connection to the plasma
    store is failed"). What killed it was not found (25 shutdown-and-start cycles here did not
    repeat it); waiting removes the overlap that run had."""
    import ray

    mine = _descendants(os.getpid())
    ray.shutdown()
    deadline = time.monotonic() + timeout_s
    while (alive := [pid for pid in mine if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive:
        print(f"shutdown_ray: {len(alive)} process(es) of the old cluster still running after {timeout_s:.0f} s",
              file=sys.stderr, flush=True)


def _descendants(root: int) -> list[int]:
    """The pids of every process below `root` (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _running(pid: int) -> bool:
    """Whether `pid` still runs (an exited child not yet reaped, a zombie, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("auto", "cpu", "gpu"), default="auto",
                        help="auto: gpu when CUDA is present, else cpu")
    parser.add_argument("--losses", default=",".join(SEED_LOSSES), help="end-to-end runs, comma-separated")
    parser.add_argument("--no-peer", action="store_true", help="skip the PML + DataLoader peer")
    parser.add_argument("--backbone-steps", type=int, default=None)
    parser.add_argument("--peer-steps", type=int, default=None, help="steps of each peer run (default 120)")
    parser.add_argument("--input-sub-batches", type=int, default=None)
    parser.add_argument("--decode-images", type=int, default=None, help="JPEGs per decode measurement")
    parser.add_argument("--decode-crop", type=int, default=224,
                        help="output side of the decode + RandomResizedCrop measurement (the GPU size's 224)")
    parser.add_argument("--decode-only", action="store_true", help="only the JPEG decode measurement (no Ray)")
    parser.add_argument("--no-decode", action="store_true", help="skip the JPEG decode measurement")
    parser.add_argument("--tiny", action="store_true", help="smallest configuration (smoke test)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = parser.parse_args(argv)

    size = args.size if args.size != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if size == "gpu" and not torch.cuda.is_available():
        parser.error("--size gpu needs a CUDA device")
    device = torch.device("cuda" if size == "gpu" else "cpu")
    losses = [name for name in args.losses.split(",") if name]
    extra = (TINY_OVERRIDES if args.tiny else []) + args.overrides
    backbone_steps = args.backbone_steps or (2 if args.tiny else 30 if size == "gpu" else 10)
    summary: dict = {"size": size, "losses": losses, "tiny": args.tiny}
    print(json.dumps({
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "size": size, "losses": losses, "overrides": extra,
    }), flush=True)

    decode_count = args.decode_images or (4 if args.tiny else 100)
    decode_sizes = [(500, 375)] if args.tiny else [(500, 375), (1024, 768)]
    if args.decode_only:
        if not args.no_decode:
            summary["decode"] = jpeg_decode(decode_sizes, decode_count, args.decode_crop, device)
        print(json.dumps({"summary": summary}), flush=True)
        return

    import ray

    from pipeline.evaluation.protocol import resolve_evaluation
    from pipeline.training.driver import resolve_dataset

    with tempfile.TemporaryDirectory() as scratch:
        configs = {name: loss_config(size, name, extra, scratch) for name in losses}
        # The m_per_class plan (softtriple's) for the input pipeline alone: Magnet's and PDDM's
        # planners wait for their refresh actor, which only a training run starts.
        first = configs.get("softtriple") or loss_config(size, "softtriple", extra, scratch)
        root, metadata = resolve_dataset(first)
        first = resolve_evaluation(first, metadata)  # the test split the data graph reads

        summary["backbone_images_per_s"] = {}
        for batch in sorted({c.global_batch_size if device.type == "cpu" else c.sub_batch_size
                             for c in configs.values()} or {first.sub_batch_size}):
            if device.type == "cpu":  # the training workers' threads, all at once
                torch.set_num_threads(max(1, round(first.train.num_workers * first.train.torch_threads)))
            row = bare_backbone(first, batch, device, backbone_steps)
            summary["backbone_images_per_s"][batch] = row["images_per_s"]
            print(json.dumps({"backbone": row}), flush=True)

        ray.init(num_cpus=max(4, os.cpu_count() or 1), log_to_driver=False, include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        sub_batches = args.input_sub_batches or (4 if args.tiny else 120)
        row = {"preset": LOSS_CONFIGS[size]["softtriple"][0], "decode_actors": first.data.decode_actors,
               **measure_input_pipeline(first, root, sub_batches)}
        summary["input_images_per_s"] = round(row["input_images_per_s"], 1)
        print(json.dumps({"input": row}), flush=True)
        shutdown_ray()

        # Each loss's peer runs right after our run of it, so the pair sees the same machine.
        summary["train_images_per_s"], summary["peer"] = {}, {}
        summary["no_peer_in_pml"] = [name for name in losses if name not in PML_PEERS]
        for name, config in configs.items():
            row = measure_training(config)
            row = {"loss": name, "batch_per_rank": config.sub_batch_size, "workers": config.train.num_workers,
                   "train_images_per_s": _finite(row["train_images_per_s"], 1),
                   "train_data_wait_fraction": _finite(row["train_data_wait_fraction"], 4)}
            bare = summary["backbone_images_per_s"].get(
                config.global_batch_size if device.type == "cpu" else config.sub_batch_size)
            if bare and row["train_images_per_s"]:  # one GPU per worker: the bare figure scales with the workers
                per = bare if device.type == "cpu" else bare * config.train.num_workers
                row["fraction_of_bare_backbone"] = round(row["train_images_per_s"] / per, 3)
            summary["train_images_per_s"][name] = row["train_images_per_s"]
            print(json.dumps({"train": row}), flush=True)
            shutdown_ray()  # each run starts its own cluster (run_training starts it)
            if args.no_peer or name not in PML_PEERS:
                continue
            steps = args.peer_steps or (2 * config.train.log_every_steps + 1 if args.tiny else 120)
            workers = max(1, round(config.data.decode_actors * config.data.decode_cpus)) if device.type == "cpu" \
                else config.data.decode_actors
            peer = peer_training(name, config, root, device, steps, workers)
            if peer["images_per_s"] and row["train_images_per_s"]:
                peer["ours_over_peer"] = round(row["train_images_per_s"] / peer["images_per_s"], 3)
            summary["peer"][name] = peer
            print(json.dumps({"peer": peer}), flush=True)

        if not args.no_decode:
            summary["decode"] = jpeg_decode(decode_sizes, decode_count, args.decode_crop, device)
        print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
