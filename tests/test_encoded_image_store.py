"""`EncodedImageStore`: a split's encoded images addressed by example id, whatever block and
row Ray Data put each example in. The decode actors and the refresh actor fetch images
through it, so an id must always give that example's own bytes and label."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.decoding import EncodedImageStore


def _dataset(ids, labels):
    import ray.data

    # Two blocks, ids out of order across them, as a shuffled read could leave them.
    tables = [
        pa.table({"id": ids[part], "label": labels[part], "image": [f"bytes of {i}".encode() for i in ids[part]]})
        for part in (slice(0, 4), slice(4, None))
    ]
    return ray.data.from_arrow(tables)


def test_an_id_gives_its_own_bytes_and_label(ray_local):
    ids = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    labels = np.array([30, 10, 30, 20, 10, 20, 30, 10])  # id i has label labels[ids == i]
    store = EncodedImageStore.from_dataset(_dataset(ids, labels))

    encoded = store.encoded_images()
    assert len(store) == 8
    assert [encoded(i) for i in range(8)] == [f"bytes of {i}".encode() for i in range(8)]
    # Labels are remapped to 0..C-1 in the order of the original classes, which `classes` keeps.
    np.testing.assert_array_equal(store.classes, [10, 20, 30])
    expected = [labels[ids == i][0] for i in range(8)]
    np.testing.assert_array_equal(store.classes[store.labels], expected)


def test_ids_with_a_gap_are_refused(ray_local):
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 9])  # 7 and 8 missing
    with pytest.raises(ValueError, match=r"example ids must be dense 0\.\.7; found id 9"):
        EncodedImageStore.from_dataset(_dataset(ids, np.zeros(8, dtype=np.int64)))
