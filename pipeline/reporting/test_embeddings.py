"""The test split's embeddings at the final evaluation, saved with the run's last checkpoint.

Rank 0 already holds them after evaluating; saving them lets the driver plot the run without
embedding the test split again (which on a large split needs the workers' accelerators).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEST_EMBEDDINGS_FILE = "test_embeddings.npz"


@dataclass
class EmbeddedSplit:
    """Embeddings [N, D] of a split with each image's label and example id [N]."""

    embeddings: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


def save_test_embeddings(
    directory: str, embeddings: np.ndarray, labels: np.ndarray, ids: np.ndarray
) -> None:
    """Write the final evaluation's embeddings, labels and ids into a checkpoint directory."""
    np.savez(
        Path(directory) / TEST_EMBEDDINGS_FILE,
        embeddings=np.asarray(embeddings, dtype=np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        ids=np.asarray(ids, dtype=np.int64),
    )


def load_test_embeddings(directory: str) -> EmbeddedSplit | None:
    """What `save_test_embeddings` wrote, or None when the checkpoint has none."""
    path = Path(directory) / TEST_EMBEDDINGS_FILE
    if not path.exists():
        return None
    with np.load(path) as saved:
        return EmbeddedSplit(saved["embeddings"], saved["labels"], saved["ids"])
