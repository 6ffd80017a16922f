"""The faiss index of an export: built from the exported embeddings, searched by example id.

The index is `IDMap2` around any `faiss.index_factory` description ("Flat", the default, is
exact; "IVF1024,Flat" or "HNSW32" trade exactness for speed on large sets), with squared L2
distance as in the evaluation. Searches return dataset ids, not row positions. Files go
through pyarrow.fs, so an export directory may be local or `s3://`.
"""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipeline.serving.embedding import embedding_matrix, embeddings_table
from pipeline.storage import filesystem_for

INDEX_FILE = "index.faiss"
EMBEDDINGS_DIR = "embeddings"
MANIFEST_FILE = "export.json"
"""Written last: an export directory without it is unfinished."""


def write_embeddings(
    export_dir: str, ids: np.ndarray, labels: np.ndarray, embeddings: np.ndarray
) -> str:
    """Write the embeddings (rows in id order) as Parquet under the export directory."""
    filesystem, path = filesystem_for(export_dir)
    filesystem.create_dir(f"{path}/{EMBEDDINGS_DIR}")
    pq.write_table(
        embeddings_table(ids, labels, embeddings),
        f"{path}/{EMBEDDINGS_DIR}/part-00000.parquet",
        filesystem=filesystem,
    )
    return f"{export_dir.rstrip('/')}/{EMBEDDINGS_DIR}"


class ExportUnfinished(ValueError):
    """The export directory has no manifest: its export job is running, failed or was stopped."""


def _finished_export(export_dir: str):
    """(filesystem, path) of a finished export (its manifest, written last, is there)."""
    import pyarrow.fs as pafs

    filesystem, path = filesystem_for(export_dir)
    if filesystem.get_file_info(f"{path}/{MANIFEST_FILE}").type != pafs.FileType.File:
        raise ExportUnfinished(
            f"{export_dir}: no {MANIFEST_FILE}, so not a finished export (its job may still be "
            f"running, or it failed or was stopped: run it again)"
        )
    return filesystem, path


def read_embeddings(export_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [N] (ascending), labels [N] and embeddings [N, D] float32 of a finished export."""
    filesystem, path = _finished_export(export_dir)
    table = pq.read_table(f"{path}/{EMBEDDINGS_DIR}", filesystem=filesystem).sort_by("id")
    ids = table.column("id").to_numpy()
    return ids, table.column("label").to_numpy(), embedding_matrix(table)


def _factory(dim: int, description: str):
    try:
        return faiss.index_factory(dim, f"IDMap2,{description}", faiss.METRIC_L2)
    except RuntimeError as err:
        raise ValueError(
            f"index description {description!r}: faiss cannot build it ({err})"
        ) from err


def check_index_description(dim: int, description: str) -> None:
    """Fail now, naming the description, if faiss cannot build such an index."""
    _factory(dim, description)


def build_index(embeddings: np.ndarray, ids: np.ndarray, description: str = "Flat"):
    """A faiss index over `embeddings` whose searches return `ids`; trained first when the
    description needs it (IVF, PQ)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = _factory(embeddings.shape[1], description)
    if not index.is_trained:
        index.train(embeddings)
    index.add_with_ids(embeddings, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def save_index(index, export_dir: str) -> str:
    """Write the index into the export directory; returns its path."""
    filesystem, path = filesystem_for(export_dir)
    with filesystem.open_output_stream(f"{path}/{INDEX_FILE}") as stream:
        stream.write(faiss.serialize_index(index))  # the uint8 array itself: no bytes copy of the index
    return f"{export_dir.rstrip('/')}/{INDEX_FILE}"


def load_index(export_dir: str):
    """The faiss index of a finished export (searches return dataset ids)."""
    filesystem, path = _finished_export(export_dir)
    with filesystem.open_input_stream(f"{path}/{INDEX_FILE}") as stream:
        data = stream.read()
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
