"""Use a trained model: evaluate a checkpoint on any dataset, export embeddings and a faiss index.

`checkpoints` finds and fetches a checkpoint, `embedding` runs Ray Data batch inference,
`index` builds and reads the faiss index, `export` and `evaluation` are what the jobs call,
`driver_tasks` how their Ray tasks (the metrics, the export's writing) take CPUs and errors.
"""

DEVICES = ("auto", "gpu", "cpu")
"""Where the embedding actors run (`--device`): `auto` on a GPU each when the cluster has GPUs
up, else on CPUs; `gpu` on a GPU each even when none is up yet (an autoscaling cluster adds
GPU nodes for them); `cpu` on CPUs. Here, not in `embedding`, so the jobs' argument parsers
need not import torch."""


def add_device_flag(parser) -> None:
    """The jobs' `--device` option (`DEVICES`)."""
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the embedding actors run: auto (a GPU each when the cluster has GPUs up, else "
        "CPUs; default), gpu (a GPU each, waiting for an autoscaler to add GPU nodes), cpu",
    )
