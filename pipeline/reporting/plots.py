"""The run's plots as matplotlib figures: arrays in, figure out; `figure_png` renders one.

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas, never
through pyplot, so no display and no global figure state are involved (safe in any thread).
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

CORRECT = (40, 170, 60)
"""Border colour of a neighbour of the query's class."""
WRONG = (215, 40, 40)
"""Border colour of a neighbour of another class."""
QUERY = (90, 90, 90)
"""Border colour of the query image."""


def figure_png(figure: Figure, dpi: int = 100) -> bytes:
    """The figure rendered as PNG bytes (Agg)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def recall_at_k_figure(ks: np.ndarray, recalls: np.ndarray) -> Figure:
    """Recall@K against K (log scale) at the final evaluation."""
    figure = Figure(figsize=(5, 3.6))
    axes = figure.add_subplot()
    axes.plot(ks, recalls, marker="o")
    axes.set_xscale("log", base=2)
    axes.set_xticks(ks, [str(k) for k in ks])
    axes.set_ylim(0, 1.1)  # room for the value labels above 1.0
    axes.set_xlabel("K")
    axes.set_ylabel("Recall@K")
    axes.set_title("Recall@K on the test split (unseen classes)")
    axes.grid(alpha=0.3)
    for k, recall in zip(ks, recalls, strict=True):
        axes.annotate(
            f"{recall:.3f}",
            (k, recall),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
        )
    return figure


def training_curves_figure(
    loss: tuple[np.ndarray, np.ndarray], test: dict[str, tuple[np.ndarray, np.ndarray]]
) -> Figure:
    """Training loss against step (left) and test metrics against step (right); `loss` and
    each entry of `test` are (steps, values)."""
    figure = Figure(figsize=(10, 3.6))
    left, right = figure.subplots(1, 2)
    left.plot(*loss)
    left.set_title("training loss")
    right.set_title("test split")
    for name, (steps, values) in test.items():
        right.plot(steps, values, marker="o", label=name)
    right.set_ylim(0, 1.02)
    if test:
        right.legend(fontsize=8)
    for axes in (left, right):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    return figure


def projection_figure(
    points: np.ndarray,
    labels: np.ndarray,
    class_names: dict[int, str] | None = None,
    method: str = "t-SNE",
) -> Figure:
    """2-D points coloured by class (up to 20 classes get distinct colours), with a legend."""
    import matplotlib

    figure = Figure(figsize=(7, 5.5))
    axes = figure.add_subplot()
    classes = np.unique(labels)
    colours = matplotlib.colormaps["tab20"].resampled(max(len(classes), 1))
    for i, label in enumerate(classes):
        mine = labels == label
        name = (class_names or {}).get(int(label), str(label))
        axes.scatter(points[mine, 0], points[mine, 1], s=8, color=colours(i), label=name)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(f"{method} of test embeddings ({len(points)} images, {len(classes)} classes)")
    axes.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure


def bordered(
    image: np.ndarray, colour: tuple[int, int, int], width: int | None = None
) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] framed by a border of `colour` (default width: 1/12 side)."""
    width = width or max(2, min(image.shape[:2]) // 12)
    framed = np.empty((image.shape[0] + 2 * width, image.shape[1] + 2 * width, 3), dtype=np.uint8)
    framed[:] = colour
    framed[width:-width, width:-width] = image
    return framed


def retrieval_grid_figure(
    query_images: list[np.ndarray],
    neighbour_images: list[list[np.ndarray]],
    correct: np.ndarray,
    query_titles: list[str] | None = None,
) -> Figure:
    """One row per query: the query image, then its nearest neighbours in order, framed green
    when of the query's class and red otherwise. `correct` is a bool array [Q, k]."""
    rows, cols = len(query_images), 1 + max((len(n) for n in neighbour_images), default=0)
    if rows == 0:
        raise ValueError("a retrieval grid needs at least one query")
    figure = Figure(figsize=(1.3 * cols, 1.4 * rows))
    grid = np.atleast_2d(figure.subplots(rows, cols, squeeze=False))
    for row in range(rows):
        images = [bordered(query_images[row], QUERY)] + [
            bordered(image, CORRECT if hit else WRONG)
            for image, hit in zip(neighbour_images[row], correct[row], strict=True)
        ]
        for col, axes in enumerate(grid[row]):
            axes.set_axis_off()
            if col < len(images):
                axes.imshow(images[col])
        grid[row, 0].set_title(query_titles[row] if query_titles else "query", fontsize=7)
    for col in range(1, cols):
        grid[0, col].set_title(f"#{col}", fontsize=7)
    figure.suptitle("nearest test images (green: same class, red: other class)", fontsize=9)
    return figure
