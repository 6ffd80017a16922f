"""`EncodedImageStore`: a split's encoded images addressed by example id, whatever block and
row Ray Data put each example in, and `TrainBatchDecoder`, which decodes sub-batches through it.
The decode actors and the refresh actor fetch images this way, so an id must always give that
example's own bytes and label."""

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


def test_indexing_leaves_the_images_in_the_object_store(ray_local, monkeypatch):
    """The driver indexes the split from each block's ids and labels alone: fetching the blocks
    themselves would copy every encoded image to the head node and into the driver's memory."""
    import ray

    fetched = []
    real_get = ray.get

    def recording_get(refs, *args, **kwargs):
        values = real_get(refs, *args, **kwargs)
        fetched.extend(values if isinstance(values, list) else [values])
        return values

    monkeypatch.setattr(ray, "get", recording_get)
    ids = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    store = EncodedImageStore.from_dataset(_dataset(ids, ids % 3))

    assert fetched, "the store was indexed without asking the object store"
    assert not any(isinstance(value, pa.Table) for value in fetched), "a whole block reached the driver"
    np.testing.assert_array_equal(store.classes[store.labels], np.arange(8) % 3)


def test_ids_with_a_gap_are_refused(ray_local):
    ids = np.array([0, 1, 2, 3, 4, 5, 6, 9])  # 7 and 8 missing
    with pytest.raises(ValueError, match=r"example ids must be dense 0\.\.7; found id 9"):
        EncodedImageStore.from_dataset(_dataset(ids, np.zeros(8, dtype=np.int64)))


def test_a_block_of_sub_batches_is_those_decoded_one_at_a_time(ray_local):
    """A decode call over a block (the shared stream's 8 sub-batches) fills one array; every
    sub-batch must land at its own place, equal to the same plan index decoded alone."""
    import io

    import ray
    from PIL import Image

    from pipeline.data.decoding import TrainBatchDecoder
    from pipeline.data.planning import MPerClassPlanner

    rng = np.random.default_rng(0)
    images = []
    for _ in range(24):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(36, 44, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    labels = np.repeat(np.arange(6), 4)
    store = EncodedImageStore([ray.put(pa.table({"image": images}))], np.zeros(24, np.int32), np.arange(24),
                              labels, np.arange(6))
    planner = MPerClassPlanner(labels, classes_per_batch=3, samples_per_class=2, seed=1)
    decoder = TrainBatchDecoder(planner, store, image_size=24, crop_scale_min=0.5, seed=3,
                                index_offset=1, index_stride=2)

    block = decoder({"id": np.arange(4)})
    assert block["images"].shape == (4, 6, 3, 24, 24) and block["images"].dtype == np.uint8
    np.testing.assert_array_equal(block["index"], [1, 3, 5, 7])
    for k in range(4):
        alone = decoder({"id": np.array([k])})
        for column in ("index", "images", "labels", "ids"):
            np.testing.assert_array_equal(block[column][k], alone[column][0])
    assert len({block["images"][k].tobytes() for k in range(4)}) == 4  # four different sub-batches
