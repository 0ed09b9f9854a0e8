"""Figures for a person to look at: CAMs per class and Table 3 row, prediction strips, training curves.

Every drawing function returns a matplotlib `Figure` built with the object API (no pyplot, no
display, no global state), so a test can read its layout (panel titles, legend, colour bar)
without looking at pixels; `save_figure` writes it. Colours follow the dataset palette
(`ssr.data.layout.voc_palette`, the colours of the label PNGs).

Which images a stage draws: `FigureCandidates` keeps, while a stage streams over a split, the
first images and the lowest-IoU ones so far, and hands back the `n` to draw at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ssr.data.layout import IGNORE_INDEX, atomic_path, voc_palette

# The words a person reads for each CAM row (paper Tables 3 and 4), in figures, tables and logs.
ROW_TITLES = {"cam": "CAM", "clip": "+ CLIP attention", "dino": "+ DINO attention", "sgc": "+ SGC mask",
              "method": "configured method", "cam_without_cmpa": "CAM without CMPA"}
CAM_COLOURMAP = "jet"
CAM_ALPHA = 0.5  # the heat map over the image: half and half keeps both readable
PANEL_INCHES = 2.0


def colourise(label: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 in the VOC palette."""
    palette = np.array(voc_palette(), np.uint8).reshape(256, 3)
    return palette[label]


def class_legend(indices, class_names: list[str]) -> list[Patch]:
    """One palette-coloured patch per label index (255 is "ignore"), in index order."""
    palette = np.array(voc_palette(), np.float64).reshape(256, 3) / 255
    return [Patch(facecolor=palette[i], edgecolor="black", linewidth=0.5,
                  label="ignore" if i == IGNORE_INDEX else class_names[i]) for i in sorted({int(i) for i in indices})]


def save_figure(fig: Figure, path: Path, dpi: int = 100) -> None:
    """Write a figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def _bare(ax) -> None:
    # ticks off but the axes kept (not axis("off")), so a y label can still name the row
    ax.set_xticks([])
    ax.set_yticks([])


def _panel(ax, name: str, panel: np.ndarray | None) -> None:
    """An image or label-colour panel titled `name`; "none" where there is nothing to show (no ground truth)."""
    _bare(ax)
    ax.set_title(name)
    if panel is None:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.imshow(panel, interpolation="nearest")


def _legend(fig: Figure, handles: list[Patch]) -> None:
    # below the panels, in rows: the title above stays clear whatever its length
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), title="classes", frameon=False)


def _present(*labels: np.ndarray | None) -> set[int]:
    return {int(v) for label in labels if label is not None for v in np.unique(label)}


# ------------------------------------------------------------------ CAMs per class and row

def distinct_rows(cams: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """Rows with different CAMs -> the rows each stands for, in order.

    The configured method is often one of Table 3's rows (all switches on: "+ SGC mask"); a row
    whose CAM equals an earlier one's is drawn once, under both names.
    """
    shown: dict[str, list[str]] = {}
    for row, cam in cams.items():
        same = next((kept for kept in shown if np.array_equal(cams[kept], cam)), None)
        if same is None:
            shown[row] = [row]
        else:
            shown[same].append(row)
    return shown


def row_title(rows: list[str]) -> str:
    """The words for a CAM row that stands for `rows` (see `distinct_rows`), one per line."""
    return "\n= ".join(ROW_TITLES.get(r, r) for r in rows)


def cam_figure(image: np.ndarray, gt: np.ndarray | None, label: np.ndarray, cams: Mapping[str, np.ndarray],
               classes: list[int], class_names: list[str], *, title: str = "") -> Figure:
    """The CAMs of one image: one panel per present class for each CAM row.

    image (H, W, 3) uint8; gt (H, W) label indices or None; label (H, W) the pseudo-label;
    cams: row key -> (K, H, W) in [0, 1], one map per present class, rows in display order;
    classes: the K label indices (into `class_names`, 0 = background) of those maps.
    Layout: a first row image | ground truth | pseudo-label, then one row per distinct CAM row
    (named in words at its left, `distinct_rows`), each panel titled with its class name; a
    colour bar for the CAM scores and a legend of the classes in the label colours.
    """
    groups = distinct_rows(cams)
    columns = max(3, len(classes))
    fig = Figure(figsize=(PANEL_INCHES * columns + 1.6, PANEL_INCHES * (1 + len(groups)) + 0.4), layout="constrained")
    grid = fig.add_gridspec(1 + len(groups), columns)
    header = [("image", image), ("ground truth", None if gt is None else colourise(gt)), ("pseudo-label", colourise(label))]
    for k, (name, panel) in enumerate(header):
        _panel(fig.add_subplot(grid[0, k]), name, panel)
    heat = None
    cam_axes = []
    for r, (row, names) in enumerate(groups.items(), start=1):
        for k, index in enumerate(classes):
            ax = fig.add_subplot(grid[r, k])
            _bare(ax)
            ax.imshow(image)
            heat = ax.imshow(cams[row][k], cmap=CAM_COLOURMAP, vmin=0, vmax=1, alpha=CAM_ALPHA)
            ax.set_title(class_names[index])
            if k == 0:
                ax.set_ylabel(row_title(names))
            cam_axes.append(ax)
    if heat is not None:
        fig.colorbar(heat, ax=cam_axes, label="CAM score", shrink=0.8)
    _legend(fig, class_legend(_present(gt, label) | {0}, class_names))
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


# ------------------------------------------------------------------ prediction strips

def prediction_figure(image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray, pred_crf: np.ndarray | None,
                      class_names: list[str], *, title: str = "") -> Figure:
    """One val image: image | ground truth | prediction | prediction after DenseCRF (when given).

    image (H, W, 3) uint8; gt, pred, pred_crf (H, W) label indices. A legend names the classes
    present in any of them, in the label colours.
    """
    panels = [("image", image), ("ground truth", None if gt is None else colourise(gt)), ("prediction", colourise(pred))]
    if pred_crf is not None:
        panels.append(("after DenseCRF", colourise(pred_crf)))
    fig = Figure(figsize=(PANEL_INCHES * len(panels) + 1.6, PANEL_INCHES + 0.6), layout="constrained")
    for k, (name, panel) in enumerate(panels):
        _panel(fig.add_subplot(1, len(panels), k + 1), name, panel)
    _legend(fig, class_legend(_present(gt, pred, pred_crf), class_names))
    if title:
        fig.suptitle(title, fontsize="medium")
    return fig


# ------------------------------------------------------------------ training curves

def curve_figure(name: str, runs: Mapping[str, Mapping[int, tuple[np.ndarray, np.ndarray]]]) -> Figure:
    """One logged training quantity: a panel per run, its seeds overlaid.

    runs: run -> seed -> (steps (T,), values (T,)).
    """
    fig = Figure(figsize=(4.5 * len(runs), 3.4), layout="constrained")
    # each run its own y scale: the variants' losses are other losses (Table 4), not the same one lower
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (run, seeds) in zip(axes, runs.items(), strict=True):
        for seed, (steps, values) in sorted(seeds.items()):
            ax.plot(steps, values, label=f"seed {seed}", linewidth=1)
        ax.set_title(run)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel(name)
    fig.suptitle(name, fontsize="medium")
    return fig


# ------------------------------------------------------------------ which images to draw

def worst_images(ious: Mapping[str, float], k: int) -> list[str]:
    """The `k` image ids of lowest IoU, lowest first (equal IoUs: by id)."""
    return [i for i, _ in sorted(ious.items(), key=lambda item: (item[1], item[0]))[:max(k, 0)]]


@dataclass
class FigureCandidates:
    """The `n` images a stage draws: the `n // 2` of lowest IoU ("worst"), and the first images of
    the stream that are not among them ("first"), `n` in all (fewer when the stream is shorter).

    `offer` each image as the stage streams over its split; the figure data (whatever `make()`
    returns) is computed and held only for images that can still be drawn: the first `n` and
    the lowest-IoU ones so far. An image without an IoU (no ground truth) can only be "first".
    """

    n: int
    first: list = field(default_factory=list)  # the first n ids offered, in order
    worst: dict = field(default_factory=dict)  # id -> IoU of the lowest-IoU ids so far (at most n // 2)
    data: dict = field(default_factory=dict)

    def offer(self, image_id: str, iou: float | None, make: Callable[[], object]) -> None:
        if len(self.first) < self.n:
            self.first.append(image_id)
        if iou is not None:
            pool = {**self.worst, image_id: iou}
            self.worst = {i: pool[i] for i in worst_images(pool, self.n // 2)}
        keep = set(self.first) | set(self.worst)
        if image_id in keep:
            self.data[image_id] = make()
        self.data = {i: d for i, d in self.data.items() if i in keep}

    def picks(self) -> list[tuple[str, int, str, object]]:
        """(selection, rank, id, data): the worst by rising IoU, then the first images in order; ranks from 1."""
        worst = list(self.worst)
        first = [i for i in self.first if i not in self.worst][: self.n - len(worst)]
        return ([("worst", k, i, self.data[i]) for k, i in enumerate(worst, 1)]
                + [("first", k, i, self.data[i]) for k, i in enumerate(first, 1)])

    def titled(self, measure: str, among: str) -> list[tuple[str, str, object]]:
        """(file name, title, data) per pick; the title names the image and why it was picked:
        "lowest {measure} no. {rank} of {among}" or "first image no. {rank}"."""
        return [(figure_name(selection, rank, image_id),
                 f"{image_id}\n" + (f"lowest {measure} no. {rank} of {among}" if selection == "worst"
                                     else f"first image no. {rank}"),
                 data)
                for selection, rank, image_id, data in self.picks()]


def figure_name(selection: str, rank: int, image_id: str) -> str:
    """`{selection}_{rank}_{id}.png`: selection "first" (split order) or "worst" (rank 1 = lowest IoU)."""
    return f"{selection}_{rank}_{image_id}.png"


def replace_figures(folder: Path, figures: Mapping[str, Figure]) -> None:
    """Write {file name: figure} into `folder`, then remove the PNGs of an earlier run that are not among them."""
    for name, fig in figures.items():
        save_figure(fig, folder / name)
    for old in folder.glob("*.png"):
        if old.name not in figures:
            old.unlink()
