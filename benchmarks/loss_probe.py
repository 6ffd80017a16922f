"""A loss's first steps in one process (no Ray): loss, embedding spread and test Recall@1.

For diagnosing a loss quickly on the built-in dataset: it trains the `local` preset's model with
the given overrides on P=16 x M=4 batches (eval-size images, train augmentation) and prints,
every 20 steps, the loss and its stats, the mean cosine between the test embeddings of 64
images (near 1 = collapsed) and Recall@1 on the unseen test classes.

    python benchmarks/loss_probe.py 61 loss.name=pddm loss.pddm.quadruplets=per_positive_pair
    python benchmarks/loss_probe.py 61 loss.name=pddm --detach-scores   # E_m trains the unit only
    python benchmarks/loss_probe.py 101 --save /tmp/triplet.pt           # then warm-start from it:
    python benchmarks/loss_probe.py 61 loss.name=pddm --init /tmp/triplet.pt
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.data.decoding import decode_rgb, eval_transform, train_transform
from pipeline.data.format import read_metadata, read_split
from pipeline.data.planning import MPerClassPlanner
from pipeline.data.synthetic import SyntheticSpec, ensure_synthetic
from pipeline.evaluation.metrics import retrieval_metrics
from pipeline.evaluation.protocol import resolve_evaluation
from pipeline.learner import MetricLearner
from pipeline.losses import build_loss
from pipeline.models import build_model
from pipeline.training.optim import build_optimizer, build_scheduler


def load(root, split, config):
    table = read_split(root, split, ["label", "image"])
    transform = eval_transform(config.data.image_size, config.data.eval_resize)
    images = torch.stack([transform(decode_rgb(b.as_py())) for b in table.column("image")])
    return images, np.asarray(table.column("label"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", type=int)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE settings on top of the local preset")
    parser.add_argument("--detach-scores", action="store_true",
                        help="PDDM: score detached features, so E_m trains the unit and not the embedding")
    parser.add_argument("--init", help="start from this embedding state_dict (a --save file or a checkpoint's model.pt)")
    parser.add_argument("--save", help="save the embedding state_dict here at the end")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_config("local", args.overrides)
    root = ensure_synthetic(config.data.cache_dir, SyntheticSpec(**vars(config.data.synthetic)))
    config = resolve_evaluation(config, read_metadata(root))  # the test split, Recall@K cut-offs
    if args.detach_scores:
        from pipeline.losses import pddm

        scores = pddm.PDDMUnit.pairwise_scores
        pddm.PDDMUnit.pairwise_scores = lambda unit, features: scores(unit, features.detach())
    train_images, train_labels = load(root, config.data.train_split, config)
    test_images, test_labels = load(root, config.data.test_split, config)
    dense = np.unique(train_labels, return_inverse=True)[1]

    torch.manual_seed(config.train.seed)
    embedder = build_model(config.model)
    if args.init:
        embedder.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    loss = build_loss(config.loss, int(dense.max()) + 1, config.model.embedding_dim)
    learner = MetricLearner(embedder, loss)
    optimizer = build_optimizer(embedder, loss, config.optim, config.loss.lr)
    scheduler = build_scheduler(optimizer, config.optim, args.steps)
    planner = MPerClassPlanner(dense, 16, 4, config.train.seed)
    augment = train_transform(config.data.image_size, config.data.crop_scale_min)

    def evaluate():
        embedder.eval()
        with torch.no_grad():
            e = torch.cat([embedder(test_images[i : i + 256].float() / 255) for i in range(0, len(test_images), 256)])
        embedder.train()
        s = e[:64] @ e[:64].T
        cosine = float((s.sum() - s.diag().sum()) / (64 * 63))
        return cosine, retrieval_metrics(e.numpy(), test_labels, ks=(1,), compute_nmi=False)["recall@1"]

    start = time.perf_counter()
    for step in range(args.steps):
        ids = planner.plan(step)
        images = torch.stack([augment(train_images[i]) for i in ids]).float() / 255
        out = learner(images, torch.from_numpy(dense[ids]))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0 or step == args.steps - 1:
            cosine, recall = evaluate()
            stats = " ".join(f"{k} {v:.4f}" for k, v in out.stats.items())
            print(f"step {step:4d}  loss {float(out.loss.detach()):.4f}  cosine {cosine:.4f}  R@1 {recall:.3f}  "
                  f"{stats}  {time.perf_counter() - start:.0f}s", flush=True)
    if args.save:
        torch.save(embedder.state_dict(), args.save)


if __name__ == "__main__":
    main()
