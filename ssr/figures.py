"""Figures for a person to look at: CAMs per class and Table 3 row with SGC's regions, prediction
strips, training curves, and our figures against the paper's.

Every drawing function returns a matplotlib `Figure` built with the object API (no pyplot, no
display, no global state), so a test can read its layout (panel titles, legend, colour bar)
without looking at pixels; `save_figure` writes it. Label colours follow the dataset palette
(`ssr.data.layout.voc_palette`, the colours of the label PNGs).

Which images a stage draws: `FigureCandidates` keeps, while a stage streams over a split, the
lowest-IoU images so far and a fixed pseudo-random sample, and hands back the ones to draw at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from skimage.segmentation import find_boundaries

from ssr.data.layout import IGNORE_INDEX, atomic_path, voc_palette
from ssr.sgc import region_onehot, region_targets

# The words a person reads for each CAM row (paper Tables 3 and 4), in figures, tables and logs.
ROW_TITLES = {"cam": "CAM", "clip": "+ CLIP attention", "dino": "+ DINO attention", "sgc": "+ SGC mask",
              "method": "configured method", "cam_without_cmpa": "CAM without CMPA"}
# The CAM is drawn opaque, beside the image (never blended over it, where an object's own colour
# would read as a score), in a perceptually uniform map; the class's true outline is drawn over it.
CAM_COLOURMAP = "viridis"
OUTLINE_COLOUR = "red"
# The SGC regions (k-means clusters, superpixels.n_clusters of them): tab10 without its grey, which
# would read as a region that is no target; colours repeat beyond nine, so regions are outlined too.
REGION_COLOURS = [c for k, c in enumerate(colormaps["tab10"].colors) if k != 7]
NOT_TARGET = (0.88, 0.88, 0.88)  # a region that is no target of the class: light grey
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
    """Write a figure as PNG, atomically, its title and panel titles in the PNG's text (Title,
    Description): what a screen reader, or a test, can read without looking at pixels."""
    panels = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]
    metadata = {"Title": fig.get_suptitle().replace("\n", " "), "Description": "panels: " + " | ".join(panels)}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=metadata)


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


def _legend(fig: Figure, handles: list, title: str = "classes") -> None:
    # below the panels, in rows: the title above stays clear whatever its length
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), title=title, frameon=False)


def _present(*labels: np.ndarray | None) -> set[int]:
    return {int(v) for label in labels if label is not None for v in np.unique(label)}


# ------------------------------------------------------------------ SGC's regions

def sgc_regions(cam: torch.Tensor, region_map: torch.Tensor, grid: tuple[int, int], num_regions: int, *, t_hi: float,
                rho: float, keep_best: bool = True, denominator: str = "region") -> np.ndarray:
    """Which regions SGC takes as each class's targets (Eq. 8), as `ssr.sgc.sgc_mask` decides them.

    cam (K, N): the initial CAM of K classes on the patch grid (the CAM that SGC thresholds);
    region_map (h, w) long at the model's input size -> (K, R) bool, R = num_regions.
    """
    regions = region_onehot(region_map[None], num_regions)
    return region_targets(cam.float()[None], regions, grid, t_hi=t_hi, rho=rho, keep_best=keep_best,
                          denominator=denominator)[0].cpu().numpy()


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) integer map -> (H, W) by nearest neighbour (pixel centres), e.g. a region map to the image's size."""
    rows = np.minimum(((np.arange(size[0]) + 0.5) * label.shape[0] / size[0]).astype(int), label.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * label.shape[1] / size[1]).astype(int), label.shape[1] - 1)
    return label[rows[:, None], cols[None, :]]


def region_colours(regions: np.ndarray, num_regions: int, targets: np.ndarray | None = None) -> np.ndarray:
    """(H, W) region ids -> (H, W, 3) float RGB: one colour per region; with
    `targets` (R,) bool, the regions that are not targets in light grey."""
    colours = np.array([REGION_COLOURS[r % len(REGION_COLOURS)] for r in range(num_regions)], np.float64)
    if targets is not None:
        colours[~np.asarray(targets, bool)] = NOT_TARGET
    ids = np.clip(regions, 0, num_regions - 1)
    out = colours[ids]
    out[regions >= num_regions] = 1.0  # padding without a region
    out[find_boundaries(regions, mode="thick")] *= 0.5  # both sides of each edge
    return out


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
               classes: list[int], class_names: list[str], *, regions: np.ndarray | None = None,
               targets: np.ndarray | None = None, title: str = "") -> Figure:
    """The CAMs of one image, a row per present class, and SGC's regions.

    image (H, W, 3) uint8; gt (H, W) label indices or None; label (H, W) the pseudo-label;
    cams: row key -> (K, H, W) in [0, 1], one map per present class, rows in display order;
    classes: the K label indices (into `class_names`, 0 = background) of those maps;
    regions (H, W) region ids (SLIC + k-means, Eq. 8's C) and targets (K, R) bool, each class's
    SGC target regions (`sgc_regions`), both or neither.
    Layout: a first row image | ground truth | pseudo-label (| regions, each its own colour);
    then a row per class (named at its left): with regions, its target regions in their colours
    and the others grey, then one panel per distinct CAM row from left to right (titled in words
    above the first class, `distinct_rows`). A CAM panel is the CAM alone, opaque, with the
    class's true outline over it; a colour bar gives the CAM score and a legend the label colours.
    """
    if (regions is None) != (targets is None):
        raise ValueError("give both regions and targets, or neither")
    groups = distinct_rows(cams)
    sgc = regions is not None
    columns = max(3 + sgc, sgc + len(groups))
    fig = Figure(figsize=(PANEL_INCHES * columns + 1.4, PANEL_INCHES * (1 + len(classes)) + 0.9), layout="constrained")
    grid = fig.add_gridspec(1 + len(classes), columns)
    header = [("image", image), ("ground truth", None if gt is None else colourise(gt)), ("pseudo-label", colourise(label))]
    if sgc:
        num_regions = targets.shape[1]
        present = len(np.unique(regions[regions < num_regions]))
        header.append(("regions (SLIC + k-means)", region_colours(regions, num_regions)))
    for k, (name, panel) in enumerate(header):
        _panel(fig.add_subplot(grid[0, k]), name, panel)
    heat = None
    cam_axes = []
    for r, index in enumerate(classes):
        row_axes = []
        if sgc:
            ax = fig.add_subplot(grid[1 + r, 0])
            row_axes.append(ax)
            _panel(ax, "", region_colours(regions, num_regions, targets[r]))
            ax.set_xlabel(f"{int(targets[r].sum())} of {present} regions")
            if r == 0:
                ax.set_title("SGC target regions", fontsize="medium")
        for c, (row, names) in enumerate(groups.items(), start=sgc):
            ax = fig.add_subplot(grid[1 + r, c])
            _bare(ax)
            heat = ax.imshow(cams[row][r], cmap=CAM_COLOURMAP, vmin=0, vmax=1, interpolation="nearest")
            if gt is not None and (gt == index).any():
                ax.contour(gt == index, levels=[0.5], colors=OUTLINE_COLOUR, linewidths=1.0)
            if r == 0:
                ax.set_title(row_title(names), fontsize="medium")
            cam_axes.append(ax)
            row_axes.append(ax)
        row_axes[0].set_ylabel(class_names[index], fontsize="large")
    if heat is not None:
        fig.colorbar(heat, ax=cam_axes, label="CAM score", shrink=0.8)
    outline = [Line2D([], [], color=OUTLINE_COLOUR, linewidth=1.0, label="true outline (CAM panels)")] if gt is not None else []
    _legend(fig, class_legend(_present(gt, label) | {0}, class_names) + outline)
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

CURVE_COLUMNS = 2  # panels side by side: wider figures are shrunk to the page, and their text with them
CURVE_PANEL = (4.2, 2.8)  # inches, at 100 dpi: 420 x 280 px a panel, 10 pt text


def curve_figure(name: str, runs: Mapping[str, Mapping[int, tuple[np.ndarray, np.ndarray]]], *, title: str = "",
                 run_titles: Mapping[str, str] | None = None) -> Figure:
    """One logged training quantity: a panel per run (at most `CURVE_COLUMNS` side by side), its seeds overlaid.

    runs: run -> seed -> (steps (T,), values (T,)); title: what the quantity is (default its name);
    run_titles: run -> the words for its panel (default the run's name).
    """
    columns = min(CURVE_COLUMNS, len(runs))
    rows = -(-len(runs) // columns)
    fig = Figure(figsize=(CURVE_PANEL[0] * columns, CURVE_PANEL[1] * rows + 0.5), layout="constrained")
    # each run its own y scale: the variants' losses are other losses (Table 4), not the same one lower
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (run, seeds) in zip(axes, runs.items(), strict=False):
        for seed, (steps, values) in sorted(seeds.items()):
            ax.plot(steps, values, label=f"seed {seed}", linewidth=1)
        ax.set_title((run_titles or {}).get(run, run), fontsize="medium")
        ax.set_xlabel("iteration")
        ax.set_ylabel(name.rsplit("/", 1)[-1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    fig.suptitle(title or name)
    return fig


# ------------------------------------------------------------------ ours against the paper

@dataclass(frozen=True)
class Bar:
    """One row of a comparison: our mean over seeds with its range, and the paper's figure (or None)."""

    label: str
    mean: float
    low: float
    high: float
    paper: float | None = None


def comparison_figure(panels: Mapping[str, list[Bar]], *, paper_label: str = "paper", unit: str = "%") -> Figure:
    """Our figures beside the paper's: a panel per table, a horizontal bar per row (our mean, the
    line across it the seeds' min to max) and a diamond at the paper's figure.

    panels: panel title -> its rows, top to bottom; values on the scale they are shown (e.g. %).
    A row whose mean is NaN (could not run) shows only the paper's diamond and says "not run".
    """
    heights = [max(1, len(bars)) * 0.42 + 0.9 for bars in panels.values()]
    fig = Figure(figsize=(7.5, sum(heights) + 0.4), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    ours_handle = paper_handle = None
    for ax, (title, bars) in zip(axes, panels.items(), strict=True):
        y = np.arange(len(bars))[::-1]
        for yi, bar in zip(y, bars, strict=True):
            if np.isnan(bar.mean):
                ax.text(1, yi, "not run", va="center", fontsize="small", color="0.4")
            else:
                ours_handle = ax.barh(yi, bar.mean, height=0.6, color="tab:blue", alpha=0.75, label="ours (mean)")
                ax.plot([bar.low, bar.high], [yi, yi], color="black", linewidth=1.5)
                ax.text(bar.high, yi, f"  {bar.mean:.1f}", va="center", fontsize="small")
            if bar.paper is not None:
                paper_handle = ax.scatter([bar.paper], [yi], marker="D", color="tab:red", zorder=3, label=paper_label)
        ax.set_yticks(y, [b.label for b in bars])
        ax.set_title(title, fontsize="medium", loc="left")
        ax.set_xlabel(unit)
        ax.set_xlim(0, 105 if unit == "%" else None)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("mIoU: ours against the paper's")
    handles = [h for h in (ours_handle, paper_handle) if h is not None]
    if handles:
        fig.legend(handles=handles, labels=[h.get_label() for h in handles], loc="outside lower center", ncols=2,
                   frameon=False, title="the line across a bar: lowest to highest seed")
    return fig


# ------------------------------------------------------------------ which images to draw

def worst_images(ious: Mapping[str, float], k: int) -> list[str]:
    """The `k` image ids of lowest IoU, lowest first (equal IoUs: by id)."""
    return [i for i, _ in sorted(ious.items(), key=lambda item: (item[1], item[0]))[:max(k, 0)]]


def sample_key(image_id: str) -> str:
    """The order of the "random" picks: a hash of the id, so the sample is the same in every run,
    every stage and whatever order the images come in."""
    return hashlib.sha256(image_id.encode()).hexdigest()


@dataclass
class FigureCandidates:
    """The images a stage draws: the `n` of lowest IoU ("worst") and `n` others picked at random
    ("random"), 2n in all (fewer when the stream is shorter).

    The random picks are a fixed pseudo-random sample: the ids of lowest `sample_key`, skipping
    the worst picks so that no image is drawn twice. `offer` each image as the stage streams over
    its split; the figure data (whatever `make()` returns) is computed and held only for images
    that can still be drawn: the 2n lowest keys so far (at most n of them can end among the
    worst) and the lowest-IoU images so far. An image without an IoU (no ground truth) can only
    be a random pick.
    """

    n: int
    sample: dict = field(default_factory=dict)  # id -> sample_key of the 2n lowest keys so far
    worst: dict = field(default_factory=dict)  # id -> IoU of the lowest-IoU ids so far (at most n)
    data: dict = field(default_factory=dict)

    def offer(self, image_id: str, iou: float | None, make: Callable[[], object]) -> None:
        pool = {**self.sample, image_id: sample_key(image_id)}
        self.sample = {i: pool[i] for i in sorted(pool, key=pool.get)[: 2 * max(self.n, 0)]}
        if iou is not None:
            pool = {**self.worst, image_id: iou}
            self.worst = {i: pool[i] for i in worst_images(pool, self.n)}
        keep = set(self.sample) | set(self.worst)
        if image_id in keep:
            self.data[image_id] = make()
        self.data = {i: d for i, d in self.data.items() if i in keep}

    def picks(self) -> list[tuple[str, int, str, object]]:
        """(selection, rank, id, data): the worst by rising IoU, then the random picks in sample order; ranks from 1."""
        worst = list(self.worst)
        sample = [i for i in sorted(self.sample, key=self.sample.get) if i not in self.worst][: self.n]
        return ([("worst", k, i, self.data[i]) for k, i in enumerate(worst, 1)]
                + [("random", k, i, self.data[i]) for k, i in enumerate(sample, 1)])

    def titled(self, measure: str, among: str) -> list[tuple[str, str, object]]:
        """(file name, title, data) per pick; the title names the image and why it was picked:
        "lowest {measure} no. {rank} of {among}" or "random pick no. {rank} of {among}"."""
        return [(figure_name(selection, rank, image_id),
                 f"{image_id}\n" + (f"lowest {measure} no. {rank} of {among}" if selection == "worst"
                                     else f"random pick no. {rank} of {among}"),
                 data)
                for selection, rank, image_id, data in self.picks()]


def figure_name(selection: str, rank: int, image_id: str) -> str:
    """`{selection}_{rank}_{id}.png`: selection "random" (a fixed sample) or "worst" (rank 1 = lowest IoU)."""
    return f"{selection}_{rank}_{image_id}.png"


def replace_figures(folder: Path, figures: Mapping[str, Figure]) -> None:
    """Write {file name: figure} into `folder`, then remove the PNGs of an earlier run that are not among them."""
    for name, fig in figures.items():
        save_figure(fig, folder / name)
    for old in folder.glob("*.png"):
        if old.name not in figures:
            old.unlink()
