"""Read, resize and JPEG-encode source images: the work each Ray task does on a chunk.

No Ray here: `encode_chunk` is a plain function (the writer runs it as a Ray task), so it is
tested directly. A file that cannot be read or does not decode is returned as a SkippedImage,
never raised: one bad image must not stop a conversion of thousands.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

from PIL import Image

from pipeline.data.convert.source import (
    CORRUPT_IMAGE,
    UNREADABLE_FILE,
    SkippedImage,
    SourceImage,
)
from pipeline.data.format import root_filesystem


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored."""

    short_side: int = 256
    """Resize so the shorter side has this many pixels (0 keeps the original size)."""
    jpeg_quality: int = 95
    """JPEG quality (1-95) of the stored images."""

    def __post_init__(self) -> None:
        if self.short_side < 0:
            raise ValueError(f"short_side must be >= 0, got {self.short_side}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is `short_side` (0: unchanged)."""
    if not short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_jpeg(data: bytes, options: EncodeOptions) -> tuple[bytes, int, int]:
    """An image file's bytes as an RGB JPEG resized to the short side: (bytes, width, height).

    Raises whatever Pillow raises for bytes that are not a complete image. EXIF orientation is
    not applied, as in the field's loaders (PIL `open().convert("RGB")`).
    """
    with Image.open(io.BytesIO(data)) as image:
        size = resized_size(*image.size, options.short_side)
        # JPEG sources decode straight at a reduced scale that is still >= the target size.
        image.draft("RGB", size)
        rgb = image.convert("RGB")  # decodes everything: a truncated file raises here
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=options.jpeg_quality)
    return buffer.getvalue(), size[0], size[1]


def encode_chunk(
    source_root: str, split: str, images: list[SourceImage], options: EncodeOptions
) -> tuple[list[dict], list[SkippedImage]]:
    """Records for write_dataset of the images that encode, in order, and those skipped."""
    fs, base = root_filesystem(source_root)
    records, skipped = [], []
    for image in images:
        try:
            with fs.open_input_stream(posixpath.join(base, image.path)) as stream:
                data = stream.read()
        except OSError as err:  # missing file, permissions, a directory, a storage error
            skipped.append(SkippedImage(split, image.source_id, image.path, UNREADABLE_FILE,
                                        str(err)))  # fmt: skip
            continue
        try:
            encoded, width, height = encode_jpeg(data, options)
        except Exception as err:  # Pillow raises many types for bad bytes
            skipped.append(SkippedImage(split, image.source_id, image.path, CORRUPT_IMAGE,
                                        f"{type(err).__name__}: {err}"))  # fmt: skip
            continue
        records.append({"label": image.label, "image": encoded, "width": width, "height": height})
    return records, skipped
