"""What a checkpoint holds and how it is read back (`weights_only=True`, no pickled code)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"


def save_checkpoint(directory: str, *, learner, optimizer, scheduler, step: int, epoch: int,
                    config_yaml: str, metrics: dict) -> None:
    """Write the training state, the embedding model alone, the config and the metrics."""
    out = Path(directory)
    torch.save(learner.embedder.state_dict(), out / MODEL_FILE)
    torch.save(
        {
            "learner": learner.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": epoch,
        },
        out / STATE_FILE,
    )
    (out / CONFIG_FILE).write_text(config_yaml)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))


def load_training_state(directory: str) -> dict:
    """The dict saved by `save_checkpoint` (tensors on CPU)."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def load_metrics(directory: str) -> dict:
    """The metrics recorded with a checkpoint."""
    return json.loads((Path(directory) / METRICS_FILE).read_text())


def load_embedding_model(directory: str):
    """Rebuild the embedding network of a checkpoint from its saved config and weights."""
    import yaml

    from pipeline.config import config_from_dict
    from pipeline.models import EmbeddingNet

    config = config_from_dict(yaml.safe_load((Path(directory) / CONFIG_FILE).read_text()))
    model = EmbeddingNet(config.model.backbone, config.model.embedding_dim, config.model.normalize)
    model.load_state_dict(torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True))
    return model, config


def latest_checkpoint(storage_path: str, run_name: str):
    """(filesystem, directory, step) of the run's checkpoint with the highest step - the one Ray
    Train resumes a rerun from - or None. Works for local and `s3://` storage (pyarrow)."""
    import pyarrow.fs as pafs

    from pipeline.storage import filesystem_for

    filesystem, root = filesystem_for(storage_path.rstrip("/") + "/" + run_name)
    found = filesystem.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    best = None
    for info in found:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with filesystem.open_input_stream(f"{info.path}/{METRICS_FILE}") as stream:
                step = json.loads(stream.read())["step"]
        except (OSError, ValueError, KeyError):  # an incomplete checkpoint: Ray never reported it
            continue
        if best is None or step > best[0]:
            best = (step, info.path)
    return None if best is None else (filesystem, best[1], best[0])
