"""DDP with 2 gloo ranks must train exactly like one process on the concatenated batch.

Each rank embeds its own half of the global batch; the loss sees the gathered batch. After a
few optimizer steps the parameters (backbone, head and learned loss parameters) must match a
single process to 1e-6. Run in float64 so the comparison measures the algorithm, not rounding.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from server_process import free_port
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import load_config
from pipeline.learner import MetricLearner
from pipeline.losses import build_loss
from pipeline.models import EmbeddingNet
from pipeline.training.optim import build_optimizer

WORLD = 2
STEPS = 3
PER_RANK = 8  # 2 classes x 4 examples per rank: each rank's sub-batch is self-contained
NUM_CLASSES = 6
# Every loss, including those with learned parameters (proxies, centers, the PDDM unit).
LOSS_NAMES = [
    "triplet", "normalized_softmax", "contrastive", "multi_similarity",
    "softtriple", "pddm", "proxy_anchor",
]


def _batches():
    """Deterministic global batches: STEPS x (images [WORLD*PER_RANK, 3, 16, 16], labels)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        images = torch.rand(WORLD * PER_RANK, 3, 16, 16, generator=g, dtype=torch.float64)
        classes = torch.randperm(NUM_CLASSES, generator=g)[: WORLD * PER_RANK // 4]
        labels = classes.repeat_interleave(4)
        out.append((images, labels))
    return out


def _build(loss_name: str):
    config = load_config("local", [f"loss.name={loss_name}", "optim.name=sgd", "optim.lr=0.5",
                                   "optim.weight_decay=0.0", "loss.lr=0.5", "sampler.name=m_per_class"])
    torch.manual_seed(7)
    embedder = EmbeddingNet("tiny_cnn", 16).double()
    loss = build_loss(config.loss, NUM_CLASSES, 16).double()
    learner = MetricLearner(embedder, loss)
    optimizer = build_optimizer(learner.embedder, learner.loss, config.optim, config.loss.lr)
    return learner, optimizer


def _train(learner, optimizer, batches, rows: slice) -> None:
    for images, labels in batches:
        out = learner(images[rows], labels[rows])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()


def _rank_main(rank: int, port: int, out_path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for loss_name in LOSS_NAMES:
            learner, optimizer = _build(loss_name)
            ddp = DistributedDataParallel(learner)
            _train(ddp, optimizer, _batches(), slice(rank * PER_RANK, (rank + 1) * PER_RANK))
            results[loss_name] = {k: v.detach() for k, v in learner.state_dict().items()}
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """Parameters after DDP training on 2 gloo ranks, per loss (one spawn for all losses)."""
    out_path = str(tmp_path_factory.mktemp("parity") / "ddp.pt")
    mp.spawn(_rank_main, args=(free_port(), out_path), nprocs=WORLD, join=True)
    return torch.load(out_path, weights_only=True)


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_two_ranks_match_one_process(distributed_results, loss_name):
    distributed = distributed_results[loss_name]

    learner, optimizer = _build(loss_name)
    initial = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    _train(learner, optimizer, _batches(), slice(None))
    single = learner.state_dict()

    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-3, "training did not change the parameters; the comparison would be empty"
    for key, value in single.items():
        gap = (distributed[key] - value).abs().max().item()
        assert gap <= 1e-6, f"{key}: 2 ranks differ from one process by {gap:.3e}"
