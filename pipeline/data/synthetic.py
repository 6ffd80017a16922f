"""The built-in dataset: procedurally drawn images with several visual modes per class.

Each class owns `modes_per_class` *modes*; a mode is a shape filled with a two-colour pattern
(e.g. a red/blue striped triangle). Modes of one class share no shape, main colour or (up to
six modes) pattern, so a class is genuinely multi-modal (what Magnet and SoftTriple model);
no two modes anywhere share all of shape, pattern, main colour and second colour. Every image adds
nuisance: position, scale, a little rotation, a background gradient, colour jitter and noise.
Classes are split class-disjointly into train and test, as CUB and Cars196 are.

Everything is drawn from the seed, so a spec always produces the same bytes (and fingerprint).

    python -m pipeline.data.synthetic --preview preview.png     # look at a few classes
    python -m pipeline.data.synthetic --out /tmp/synthetic      # write the default dataset
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from pipeline.data.format import (
    DatasetFormatError,
    DatasetMetadata,
    read_metadata,
    write_dataset,
)
from pipeline.storage import absolute_location, check_location, filesystem_for

GENERATOR_VERSION = 1
"""Bump when the drawing changes: cached copies made by an older generator are not reused."""

SHAPES = (
    "disc", "square", "triangle", "ring", "cross", "diamond", "hexagon", "bars", "star",
    "half_disc",
)  # fmt: skip
"""Shape vocabulary."""
PATTERNS = ("solid", "stripes", "checker", "dots", "rings", "grid")
"""Fill-pattern vocabulary; "solid" shows only the main colour."""
PALETTE = {
    "red": (230, 45, 45),
    "orange": (250, 145, 25),
    "yellow": (245, 225, 50),
    "green": (60, 200, 70),
    "cyan": (60, 215, 235),
    "blue": (45, 85, 240),
    "purple": (150, 65, 225),
    "magenta": (240, 70, 205),
    "white": (245, 245, 245),
    "pink": (255, 170, 190),
}
"""Saturated, bright foreground colours; backgrounds are dull and dark, so shapes stand out."""
_COLOURS = tuple(PALETTE)
MAX_MODES_PER_CLASS = 6
"""Modes of a class have distinct shapes, colours and (while possible) patterns: at most 6."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the generated dataset; the default is ~7.7k 64x64 PNG images."""

    num_classes: int = 128
    """Number of classes (train and test together)."""
    modes_per_class: int = 3
    """Distinct appearances per class; 1 gives a unimodal control."""
    images_per_class: int = 60
    """Images per class, spread evenly over its modes."""
    image_size: int = 64
    """Side of the square RGB images, in pixels."""
    test_fraction: float = 0.5
    """Fraction of classes (after a seeded shuffle) held out as the test split."""
    seed: int = 0
    """Seed of everything: classes, modes, split and per-image nuisance."""

    def __post_init__(self) -> None:
        for name in ("num_classes", "modes_per_class", "images_per_class", "image_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"SyntheticSpec.{name} must be an int, got {value!r}")
        if not 1 <= self.modes_per_class <= MAX_MODES_PER_CLASS:
            raise ValueError(
                f"modes_per_class must be in 1..{MAX_MODES_PER_CLASS}, got {self.modes_per_class}"
            )
        if self.images_per_class < self.modes_per_class:
            raise ValueError(
                f"images_per_class ({self.images_per_class}) must be >= modes_per_class "
                f"({self.modes_per_class}) so that every mode has an image"
            )
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in 16..512, got {self.image_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not isinstance(self.test_fraction, float | int) or not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        num_test = self.num_test_classes
        if not 1 <= num_test < self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} with test_fraction={self.test_fraction} leaves "
                f"{num_test} test and {self.num_classes - num_test} train classes; need >= 1 each"
            )

    @property
    def num_test_classes(self) -> int:
        """Classes in the test split."""
        return round(self.num_classes * self.test_fraction)

    def to_dict(self) -> dict[str, int | float]:
        """The spec as plain JSON data."""
        return dataclasses.asdict(self)

    def cache_key(self) -> str:
        """Short stable hash of the spec and generator version, used as a directory name."""
        doc = json.dumps({"spec": self.to_dict(), "generator": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(doc.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class ModeDesign:
    """One visual mode: a shape filled with a pattern in two colours."""

    shape: str
    """One of SHAPES."""
    pattern: str
    """One of PATTERNS."""
    primary: str
    """Main colour, a PALETTE name."""
    secondary: str
    """Second pattern colour, a PALETTE name (unused, and recorded as primary, when solid)."""
    pattern_angle: float
    """Pattern orientation in radians, relative to the shape."""
    pattern_frequency: float
    """Pattern cycles per shape radius."""

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What makes modes different: two modes with equal keys would look alike."""
        return (self.shape, self.pattern, self.primary, self.secondary)

    def describe(self) -> str:
        """Human-readable name, e.g. "red/blue stripes triangle"."""
        colours = self.primary if self.pattern == "solid" else f"{self.primary}/{self.secondary}"
        return f"{colours} {self.pattern} {self.shape}"


# ----------------------------------------------------------------------------- design


def design_modes(spec: SyntheticSpec) -> list[tuple[ModeDesign, ...]]:
    """The modes of every class (index = label), drawn from the seed.

    Within a class, modes have distinct shapes and main colours, and distinct patterns while
    the vocabulary allows. No two modes share a key; a mode is sought at Hamming distance >= 2
    (in shape, pattern, primary, secondary) from all earlier modes, else at distance 1.
    """
    wanted = spec.num_classes * spec.modes_per_class
    if wanted > VOCABULARY_SIZE:
        raise ValueError(
            f"{spec.num_classes} classes x {spec.modes_per_class} modes need {wanted} distinct "
            f"modes; the generator's vocabulary has {VOCABULARY_SIZE}"
        )
    rng = np.random.default_rng([spec.seed, 0])
    taken = np.zeros(_SIZES, bool)  # taken[shape, pattern, primary, secondary]
    classes = []
    for _ in range(spec.num_classes):
        keys = np.empty((0, 4), np.int64)
        for _ in range(spec.modes_per_class):
            key = _draw_key(rng, keys, taken)
            taken[tuple(key)] = True
            keys = np.vstack([keys, key])
        classes.append(tuple(_mode_from_key(rng, key) for key in keys))
    return classes


_SOLID = PATTERNS.index("solid")
_SIZES = (len(SHAPES), len(PATTERNS), len(_COLOURS), len(_COLOURS))
VOCABULARY_SIZE = len(SHAPES) * len(_COLOURS) * (1 + (len(PATTERNS) - 1) * (len(_COLOURS) - 1))
"""Number of distinct mode keys (a solid fill has no second colour)."""


def _random_keys(rng: np.random.Generator, allowed: list[np.ndarray], count: int) -> np.ndarray:
    """`count` random keys [count, 4] with shape, pattern and primary from `allowed`."""
    shape, pattern, primary = (
        options[rng.integers(len(options), size=count)] for options in allowed
    )
    secondary = (primary + 1 + rng.integers(len(_COLOURS) - 1, size=count)) % len(_COLOURS)
    secondary = np.where(pattern == _SOLID, primary, secondary)  # solid shows one colour
    return np.stack([shape, pattern, primary, secondary], axis=1)


def _all_keys(allowed: list[np.ndarray]) -> np.ndarray:
    """Every valid key [n, 4] with shape, pattern and primary from `allowed`."""
    grid = np.meshgrid(*allowed, np.arange(len(_COLOURS)), indexing="ij")
    keys = np.stack([g.ravel() for g in grid], axis=1)
    same = keys[:, 3] == keys[:, 2]
    return keys[np.where(keys[:, 1] == _SOLID, same, ~same)]


def _within_one(keys: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """For each key [n, 4]: is a taken key equal to it in all but at most one attribute?"""
    near = np.zeros(len(keys), bool)
    for axis, size in enumerate(_SIZES):
        # Index taken with the key, except along `axis`, which takes every value.
        index = [keys[:, i, None] for i in range(4)]
        index[axis] = np.arange(size)[None, :]
        near |= taken[tuple(index)].any(axis=1)
    return near


def _draw_key(rng: np.random.Generator, siblings: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """A key unlike its siblings' in shape, pattern and primary, and free in `taken`."""
    unused = [np.setdiff1d(np.arange(size), siblings[:, i]) for i, size in enumerate(_SIZES[:3])]
    candidates = _random_keys(rng, unused, 256)
    for good in (~_within_one(candidates, taken), ~taken[tuple(candidates.T)]):
        if good.any():
            return candidates[np.argmax(good)]
    # The vocabulary is nearly used up: any free key, letting a pattern repeat within a class.
    free = _all_keys([unused[0], np.arange(len(PATTERNS)), unused[2]])
    free = free[~taken[tuple(free.T)]]
    if not len(free):
        raise ValueError(
            "the generator's vocabulary has no free mode left for a class; use fewer classes "
            "or modes per class"
        )
    return free[rng.integers(len(free))]


def _mode_from_key(rng: np.random.Generator, key: np.ndarray) -> ModeDesign:
    return ModeDesign(
        shape=SHAPES[key[0]],
        pattern=PATTERNS[key[1]],
        primary=_COLOURS[key[2]],
        secondary=_COLOURS[key[3]],
        pattern_angle=float(rng.uniform(0, np.pi)),
        pattern_frequency=float(rng.uniform(1.2, 2.0)),
    )


def split_classes(spec: SyntheticSpec) -> dict[str, list[int]]:
    """Class-disjoint split: a seeded shuffle of the labels, the first part train."""
    order = np.random.default_rng([spec.seed, 1]).permutation(spec.num_classes)
    num_train = spec.num_classes - spec.num_test_classes
    return {"train": sorted(order[:num_train].tolist()), "test": sorted(order[num_train:].tolist())}


# ----------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class Nuisance:
    """Per-image nuisance for a batch of B images (each field has leading dimension B)."""

    centre: np.ndarray
    """[B, 2] shape centre (x, y) in image coordinates [-1, 1]."""
    scale: np.ndarray
    """[B] shape radius in image half-widths."""
    rotation: np.ndarray
    """[B] rotation in radians."""
    background: np.ndarray
    """[B, 2, 3] the background gradient's two end colours, RGB in [0, 1]."""
    gradient_angle: np.ndarray
    """[B] direction of the background gradient in radians."""
    brightness: np.ndarray
    """[B] multiplier of the foreground colours."""
    noise_std: float
    """Standard deviation of the additive (uniform) pixel noise, in [0, 1] units."""

    @classmethod
    def draw(cls, rng: np.random.Generator, count: int) -> Nuisance:
        """Random nuisance for `count` images."""
        scale = rng.uniform(0.38, 0.62, count)
        # Keep most of the shape inside the frame: its centre moves at most (1 - scale).
        centre = rng.uniform(-1, 1, (count, 2)) * (1 - scale)[:, None] * 0.9
        base = rng.uniform(0.08, 0.4, (count, 1, 1))
        tint = rng.uniform(-0.08, 0.08, (count, 2, 3))
        return cls(
            centre=centre,
            scale=scale,
            rotation=rng.uniform(-0.3, 0.3, count),
            background=np.clip(base + tint + rng.uniform(-0.1, 0.1, (count, 2, 1)), 0, 1),
            gradient_angle=rng.uniform(0, 2 * np.pi, count),
            brightness=rng.uniform(0.85, 1.1, count),
            noise_std=0.035,
        )

    @classmethod
    def canonical(cls, count: int = 1) -> Nuisance:
        """No nuisance: centred, mid-sized, upright, flat dark grey, no noise (prototypes)."""
        return cls(
            centre=np.zeros((count, 2)),
            scale=np.full(count, 0.6),
            rotation=np.zeros(count),
            background=np.full((count, 2, 3), 0.2),
            gradient_angle=np.zeros(count),
            brightness=np.ones(count),
            noise_std=0.0,
        )


def _polygon_sdf(u: np.ndarray, v: np.ndarray, sides: int, inradius: float) -> np.ndarray:
    """Regular polygon with a vertex pointing up (-v): the max over its sides' half-planes."""
    field = None
    for k in range(sides):
        angle = np.pi / 2 + np.pi / sides + 2 * np.pi * k / sides
        side = float(np.cos(angle)) * u - float(np.sin(angle)) * v
        field = side if field is None else np.maximum(field, side)
    return field - inradius


def _radius(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v)  # several times faster than np.hypot


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)  # np.mod on floats is several times slower


def _shape_sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance-like field of a shape of radius ~1 in its own frame (< 0 inside)."""
    if shape == "disc":
        return _radius(u, v) - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.82
    if shape == "triangle":
        return _polygon_sdf(u, v - 0.2, 3, 0.55)
    if shape == "ring":
        return np.abs(_radius(u, v) - 0.74) - 0.26
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))
    if shape == "diamond":
        return (np.abs(u) + np.abs(v)) * (1 / 2**0.5) - 0.75
    if shape == "hexagon":
        # Folded into one quadrant: a flat-topped hexagon is two half-planes there.
        au, av = np.abs(u), np.abs(v)
        return np.maximum(au * (3**0.5 / 2) + av * 0.5, av) - 0.88
    if shape == "bars":
        gap = np.minimum(np.abs(v), np.abs(np.abs(v) - 0.66))  # bars at v = -0.66, 0, 0.66
        return np.maximum(np.abs(u) - 0.95, gap - 0.2)
    if shape == "star":
        phi = np.arctan2(u, -v)  # a point straight up
        return _radius(u, v) - (0.62 + 0.38 * np.cos(5 * phi))
    if shape == "half_disc":
        return np.maximum(_radius(u, v - 0.42) - 1.0, v - 0.42)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(mode: ModeDesign, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the secondary colour shows: 1.0, else 0.0, in the shape's frame."""
    if mode.pattern == "solid":
        return np.zeros_like(u)
    f = mode.pattern_frequency
    c, s = float(np.cos(mode.pattern_angle)) * f, float(np.sin(mode.pattern_angle)) * f
    a, b = c * u + s * v, c * v - s * u  # pattern coordinates, in cycles
    if mode.pattern == "stripes":
        shown = _frac(a) < 0.5
    elif mode.pattern == "checker":
        shown = (np.floor(a) + np.floor(b)).astype(np.int32) & 1
    elif mode.pattern == "dots":
        shown = _radius(_frac(a) - 0.5, _frac(b) - 0.5) < 0.28
    elif mode.pattern == "rings":
        shown = _frac(_radius(u, v) * (f * 1.5)) < 0.5
    elif mode.pattern == "grid":
        shown = (np.abs(_frac(a) - 0.5) > 0.33) | (np.abs(_frac(b) - 0.5) > 0.33)
    else:
        raise ValueError(f"unknown pattern {mode.pattern!r}")
    return shown.astype(u.dtype)


def render(
    mode: ModeDesign, nuisance: Nuisance, image_size: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw a batch of images of one mode: uint8 array [B, size, size, 3]."""
    f32 = np.float32

    def per_image(values: np.ndarray) -> np.ndarray:  # [B, ...] -> [B, ..., 1, 1], float32
        return values.reshape(*values.shape, 1, 1).astype(f32)

    grid = (np.arange(image_size, dtype=f32) + 0.5) / image_size * 2 - 1
    x, y = grid[None, None, :], grid[None, :, None]  # [1, 1, W], [1, H, 1]
    cx, cy = per_image(nuisance.centre[:, 0]), per_image(nuisance.centre[:, 1])
    cos = per_image(np.cos(nuisance.rotation) / nuisance.scale)
    sin = per_image(np.sin(nuisance.rotation) / nuisance.scale)
    # Image -> shape frame: translate, rotate back, divide by the radius.
    u = (x - cx) * cos + (y - cy) * sin
    v = (y - cy) * cos - (x - cx) * sin
    # Edge softness of about one pixel: convert the field from shape units to pixels.
    pixels_per_unit = per_image(nuisance.scale * (image_size / 2))
    alpha = np.clip(0.5 - _shape_sdf(mode.shape, u, v) * pixels_per_unit, 0, 1)[:, None]
    second = _pattern(mode, u, v)[:, None]
    # Channels first ([B, 3, H, W]) so that numpy's inner loops run along image rows.
    rgb = np.asarray([PALETTE[mode.primary], PALETTE[mode.secondary]], f32) / 255
    primary = per_image(nuisance.brightness[:, None] * rgb[0])
    secondary = per_image(nuisance.brightness[:, None] * rgb[1])
    foreground = primary + (secondary - primary) * second
    angle = per_image(nuisance.gradient_angle)
    t = np.clip(0.5 + 0.5 * (x * np.cos(angle) + y * np.sin(angle)), 0, 1)[:, None]
    low = per_image(nuisance.background[:, 0])
    high = per_image(nuisance.background[:, 1])
    background = low + (high - low) * t
    image = background + (foreground - background) * alpha
    if nuisance.noise_std > 0:
        if rng is None:
            raise ValueError("render needs an rng when the nuisance has noise")
        # Uniform noise of the given std: much cheaper to draw than Gaussian, looks the same.
        half_width = f32(nuisance.noise_std * 3**0.5)
        image += (rng.random(image.shape, dtype=f32) * 2 - 1) * half_width
    image = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image.transpose(0, 2, 3, 1))


def render_prototype(mode: ModeDesign, image_size: int = 64) -> np.ndarray:
    """A mode without nuisance, [size, size, 3] uint8: for checks and previews."""
    return render(mode, Nuisance.canonical(), image_size)[0]


def render_class(
    spec: SyntheticSpec, label: int, modes: tuple[ModeDesign, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """All images of one class, [images_per_class, size, size, 3] uint8, and each one's mode.

    Image j shows mode j % modes_per_class. Each class has its own random stream, so a class
    draws the same whatever else is generated.
    """
    rng = np.random.default_rng([spec.seed, 2, label])
    mode_of = np.arange(spec.images_per_class) % len(modes)
    images = np.empty((spec.images_per_class, spec.image_size, spec.image_size, 3), np.uint8)
    for index, mode in enumerate(modes):
        members = np.flatnonzero(mode_of == index)
        nuisance = Nuisance.draw(rng, len(members))
        images[members] = render(mode, nuisance, spec.image_size, rng)
    return images, mode_of


# ----------------------------------------------------------------------------- writing


def _encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Level 1: the noise makes higher levels barely smaller and several times slower.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _encoded_class(spec: SyntheticSpec, label: int, modes: tuple[ModeDesign, ...]) -> list[bytes]:
    images, _ = render_class(spec, label, modes)
    return [_encode_png(image) for image in images]


def _split_records(
    spec: SyntheticSpec, labels: list[int], modes: list[tuple[ModeDesign, ...]]
) -> Iterator[dict]:
    """The records of one split, class by class (so ids follow labels, then mode order)."""
    # numpy's loops and Pillow's PNG encoder release the GIL: two threads use both cores,
    # without the start-up cost and fork hazards of processes. map() keeps the label order.
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        encoded = pool.map(lambda label: _encoded_class(spec, label, modes[label]), labels)
        for label, images in zip(labels, encoded, strict=True):
            for data in images:
                yield {
                    "label": label,
                    "image": data,
                    "width": spec.image_size,
                    "height": spec.image_size,
                }
    finally:
        pool.shutdown(cancel_futures=True)


def class_name(label: int) -> str:
    """Name of a synthetic class, e.g. "class_017"."""
    return f"class_{label:03d}"


def generate_synthetic(
    root: str | os.PathLike[str], spec: SyntheticSpec, *, overwrite: bool = False
) -> DatasetMetadata:
    """Generate the dataset described by `spec` and write it to `root` in the standard format.

    metadata.extra holds the spec, the generator version and each class's mode descriptions.
    """
    modes = design_modes(spec)
    split = split_classes(spec)
    extra = {
        "generator_version": GENERATOR_VERSION,
        "spec": spec.to_dict(),
        "modes": {class_name(label): [m.describe() for m in ms] for label, ms in enumerate(modes)},
        "mode_of_image": "image j of a class (in id order) shows mode j % modes_per_class",
    }
    return write_dataset(
        root,
        name="synthetic",
        source="synthetic",
        class_names=[class_name(label) for label in range(spec.num_classes)],
        splits={name: _split_records(spec, labels, modes) for name, labels in split.items()},
        image_format="png",
        extra=extra,
        overwrite=overwrite,
    )


def _matches(root: str, spec: SyntheticSpec) -> bool:
    """Whether root holds a complete dataset generated from exactly this spec and generator."""
    try:
        extra = read_metadata(root).extra
    except (DatasetFormatError, OSError):
        return False
    return (
        extra.get("spec") == spec.to_dict() and extra.get("generator_version") == GENERATOR_VERSION
    )


def _object_store_copy(cache_dir: str, spec: SyntheticSpec) -> str:
    """Root of a complete copy of `spec` in an object store, writing a new one if there is none.

    Object stores cannot rename a folder into place, and a second writer of one folder would
    delete and rewrite shards that a run started on the first writer's copy is reading. So each
    writer writes its own `synthetic-<key>-<token>` folder (metadata.json last) and readers take
    the first complete one by name. Writers that race each leave a complete copy (the images
    are the same); a writer that was killed leaves a folder without metadata.json, never read.
    """
    stem = f"synthetic-{spec.cache_key()}"
    filesystem, path = filesystem_for(cache_dir)
    listed = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(posixpath.basename(info.path) for info in listed if info.type == pafs.FileType.Directory)
    for name in names:
        if name.startswith(f"{stem}-") and _matches(posixpath.join(cache_dir, name), spec):
            return posixpath.join(cache_dir, name)
    root = posixpath.join(cache_dir, f"{stem}-{uuid.uuid4().hex[:12]}")
    generate_synthetic(root, spec)
    return root


def ensure_synthetic(cache_dir: str | os.PathLike[str], spec: SyntheticSpec) -> str:
    """Root of a generated copy of `spec` under cache_dir, generating it only when missing.

    The copy lives in `<cache_dir>/synthetic-<spec.cache_key()>` and is reused when its
    metadata records the same spec and generator version. Locally it is generated in a
    temporary sibling and renamed into place, so processes racing here end with one complete
    copy. In an object store (`s3://...`) each writer has its own folder: see
    `_object_store_copy`.
    """
    cache_dir = absolute_location(cache_dir)
    root = posixpath.join(cache_dir, f"synthetic-{spec.cache_key()}")
    if _matches(root, spec):  # also a copy an earlier version wrote to an object store
        return root
    if "://" in root:
        return _object_store_copy(cache_dir, spec)
    # A scratch folder of our own: a pid is not unique across containers sharing the folder.
    os.makedirs(cache_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f"{posixpath.basename(root)}.tmp-", dir=cache_dir)
    try:
        generate_synthetic(scratch, spec, overwrite=True)
        if os.path.isdir(root) and not _matches(root, spec):
            shutil.rmtree(root)  # an unfinished copy in our own cache slot
        os.rename(scratch, root)  # atomic; fails if another process moved its copy in first
    except OSError:
        if not _matches(root, spec):
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------- preview / CLI


def contact_sheet(spec: SyntheticSpec, num_classes: int = 6, per_mode: int = 4) -> np.ndarray:
    """A grid image, one row per class: its mode prototypes, then `per_mode` images per mode."""
    modes = design_modes(spec)
    size, gap = spec.image_size, 2
    columns = spec.modes_per_class * (1 + per_mode)
    rows = min(num_classes, spec.num_classes)
    sheet = np.full((rows * (size + gap), columns * (size + gap) + gap, 3), 255, np.uint8)
    for row in range(rows):
        images, mode_of = render_class(spec, row, modes[row])
        samples = [images[mode_of == mode][:per_mode] for mode in range(spec.modes_per_class)]
        tiles = [render_prototype(m, size) for m in modes[row]] + list(np.concatenate(samples))
        for col, tile in enumerate(tiles):
            # An extra gap separates the prototypes from the samples.
            left = col * (size + gap) + (gap if col >= spec.modes_per_class else 0)
            sheet[row * (size + gap) : row * (size + gap) + size, left : left + size] = tile
    return sheet


def main(argv: list[str] | None = None) -> None:
    """CLI: write a preview contact sheet and/or generate a dataset, printing the time taken."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preview", help="write a PNG contact sheet of a few classes here")
    parser.add_argument("--out", help="generate the dataset into this root (path or URI)")
    parser.add_argument("--overwrite", action="store_true")
    for field in dataclasses.fields(SyntheticSpec):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default
        )
    args = parser.parse_args(argv)
    try:
        check_location(args.out or "", "--out")  # a mistyped URI would be a local folder
    except ValueError as err:
        parser.error(str(err))
    try:
        spec = SyntheticSpec(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticSpec)}
        )
    except ValueError as err:  # named by field: said as the flag that set it
        message = str(err)
        for field in dataclasses.fields(SyntheticSpec):
            message = re.sub(rf"\b{field.name}\b", f"--{field.name.replace('_', '-')}", message)
        parser.error(message)
    if args.preview:
        try:
            Image.fromarray(contact_sheet(spec)).save(args.preview)
        except (OSError, ValueError) as err:  # no such folder, an unknown file extension
            parser.error(f"--preview {args.preview}: {err}")
        print(f"wrote {args.preview}")
    if args.out:
        start = time.perf_counter()
        try:
            meta = generate_synthetic(args.out, spec, overwrite=args.overwrite)
        except FileExistsError as err:
            parser.error(f"--out {args.out}: {str(err).replace('overwrite=True', '--overwrite')}")
        except (OSError, ValueError) as err:
            parser.error(f"--out {args.out}: {err}")
        seconds = time.perf_counter() - start
        counts = {name: info.num_images for name, info in meta.splits.items()}
        print(
            f"wrote {args.out}: {counts} images in {seconds:.1f} s, fingerprint {meta.fingerprint[:16]}"
        )


if __name__ == "__main__":
    main()
