"""The evaluation report of tool/test.py: per-image scores, the worst images, the most-confused
class pairs, the confusion heat map, and one static HTML page that shows them all.

After an evaluation the questions are "which classes are confused with which?" and "on which
images does the model fail?". The answers come from the numbers test.py already has: the summed
confusion matrix and each image's own matrix. An image's scores are those of its matrix: pixel
accuracy over its valid (not ignored) pixels, and mIoU over the classes present in its truth or in
its prediction at those pixels (a class in neither has no IoU, as in util/metrics.py).

Everything but the writers (write_*, draw_confusion) is a pure function of arrays, so the tests check
the ranking and the numbers directly. The page needs no server and no network: styles are inline
and images are linked by paths relative to save_folder.
"""
from __future__ import annotations

import csv
import html
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from util.image_io import read_label
from util.label_maps import voc_palette
from util.metrics import SegScores, scores_from_confusion
from util.palette import colorize, side_by_side, write_png

HEATMAP_CLASSES = 30  # a 150-class matrix is unreadable; show the classes most involved in errors
CONFUSED_PAIRS = 10  # at most this many pairs ...
CONFUSED_MIN_SHARE = 0.01  # ... each holding at least 1% of its true class's pixels: the confusions that matter
WRONG_RGB = (255, 0, 0)
IGNORED_RGB = (190, 190, 190)
TRUTH_IGNORED_RGB = (0, 0, 0)  # util.palette.colorize's colour of a label without a class colour (the ignore label)
PANEL_COLUMNS = ("image", "prediction", "ground truth", "errors")  # the panels of vis/<name>.png, left to right
ARCH_NAMES = {"psp": "PSPNet", "psa": "PSANet"}
PER_IMAGE_COLUMNS = ("name", "pixel_acc", "miou", "valid_pixels")


@dataclass(frozen=True)
class ImageScore:
    """One image's scores; index is its list position, the stable order of per_image.csv."""
    index: int
    name: str
    pixel_acc: float
    miou: float
    valid: int


def image_score(index: int, name: str, counts) -> ImageScore:
    """Scores of one image from its own confusion matrix (NaN when it has no valid pixel)."""
    scores = scores_from_confusion(counts)
    return ImageScore(index, name, scores.allacc, scores.miou, int(np.asarray(scores.target).sum()))


def worst_images(scores: list[ImageScore], k: int) -> list[ImageScore]:
    """The k images with the lowest mIoU (then pixel accuracy, then list order); images without
    a valid pixel have no score and are never ranked."""
    ranked = sorted((s for s in scores if s.valid > 0), key=lambda s: (s.miou, s.pixel_acc, s.index))
    return ranked[:k]


def confused_pairs(conf: np.ndarray, limit: int = CONFUSED_PAIRS,
                   min_share: float = CONFUSED_MIN_SHARE) -> list[tuple[int, int, int, float]]:
    """(truth class, predicted class, pixels, share of the truth class's pixels) for the
    off-diagonal cells with the most pixels, most first: at most `limit`, each at least `min_share`
    of its true class (smaller confusions are noise next to them, and the heat map shows them)."""
    conf = np.asarray(conf, dtype=np.int64)
    off = conf.copy()
    np.fill_diagonal(off, 0)
    row_sums = conf.sum(axis=1)
    rows, cols = np.nonzero(off)
    kept = [(r, c) for r, c in zip(rows.tolist(), cols.tolist()) if off[r, c] >= min_share * row_sums[r]]
    order = sorted(kept, key=lambda rc: (-off[rc], rc))[:limit]
    return [(r, c, int(off[r, c]), float(off[r, c] / row_sums[r])) for r, c in order]


def heatmap_classes(conf: np.ndarray, limit: int = HEATMAP_CLASSES) -> list[int]:
    """All classes when there are at most `limit`; else the `limit` classes with the most
    misclassified pixels as truth plus as prediction, in class order."""
    conf = np.asarray(conf, dtype=np.int64)
    if len(conf) <= limit:
        return list(range(len(conf)))
    errors = conf.sum(axis=0) + conf.sum(axis=1) - 2 * np.diag(conf)
    chosen = sorted(range(len(conf)), key=lambda c: (-errors[c], c))[:limit]
    return sorted(chosen)


def row_normalised(conf: np.ndarray) -> np.ndarray:
    """Each row divided by its sum: the share of a truth class's pixels given to each prediction
    (rows without pixels stay 0)."""
    conf = np.asarray(conf, dtype=np.float64)
    sums = conf.sum(axis=1, keepdims=True)
    return np.divide(conf, sums, out=np.zeros_like(conf), where=sums > 0)


def error_map(image: np.ndarray, pred: np.ndarray, label: np.ndarray, ignore_label: int) -> np.ndarray:
    """RGB uint8: the image dimmed to grey where the prediction is right, wrong pixels in red,
    ignored pixels flat light grey."""
    grey = (np.asarray(image, dtype=np.float32).mean(axis=2) * 0.5).astype(np.uint8)
    out = np.repeat(grey[..., None], 3, axis=2)
    ignored = label == ignore_label
    out[(pred != label) & ~ignored] = WRONG_RGB
    out[ignored] = IGNORED_RGB
    return out


def evaluated_network(cfg) -> str:
    """What made the predictions scored: PNGs saved earlier, an ONNX export or a checkpoint."""
    if cfg.has_prediction:
        return f"predictions saved in {Path(cfg.save_folder) / 'gray'} (TEST.has_prediction)"
    if cfg.onnx_path:
        return f"{cfg.onnx_path} (ONNX, in onnxruntime)"
    return cfg.model_path


def write_per_image_csv(path: Path, scores: list[ImageScore]) -> None:
    """One row per image in list order; floats at full precision, `nan` when undefined."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PER_IMAGE_COLUMNS)
        for s in sorted(scores, key=lambda s: s.index):
            writer.writerow([s.name, repr(s.pixel_acc), repr(s.miou), s.valid])


def draw_confusion(path: Path, conf: np.ndarray, names: list[str], limit: int = HEATMAP_CLASSES) -> None:
    """The row-normalised matrix as a heat map with class names (matplotlib, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # not its font-cache notices in our log

    shown = heatmap_classes(conf, limit)
    share = row_normalised(conf)[np.ix_(shown, shown)]
    labels = [names[c] for c in shown]
    n = len(shown)
    side = max(4.0, 0.32 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    subset = "" if n == len(conf) else f"\nthe {n} of {len(conf)} classes with the most errors"
    ax.set_title(f"share of each true class's pixels{subset}", fontsize=10)
    if n <= 12:
        for (r, c), value in np.ndenumerate(share):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def fmt(x: float) -> str:
    """The page's number format: 4 decimals, n/a for an undefined score."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"


def count(n: int) -> str:
    """A pixel count with thousands separators: 1,356,973."""
    return f"{int(n):,}"


def _row(cells: list[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def _swatch(rgb) -> str:
    r, g, b = (int(v) for v in rgb)
    return f'<span class="swatch" data-rgb="{r},{g},{b}" style="background:rgb({r},{g},{b})"></span>'


def _class_table(scores: SegScores, names: list[str], colors: np.ndarray) -> str:
    order = sorted(range(len(names)), key=lambda c: (math.isnan(scores.iou[c]), -np.nan_to_num(scores.iou[c]), c))
    rows = [_row(["class", "IoU", "", "acc", "truth pixels"], "th")]
    for c in order:
        width = 0.0 if math.isnan(scores.iou[c]) else 100 * scores.iou[c]
        rows.append(f'<tr data-class="{c}"><td>{_swatch(colors[c])}{html.escape(names[c])}</td>'
                    f'<td class="iou">{fmt(scores.iou[c])}</td>'
                    f'<td class="barcell"><div class="bar" style="width:{width:.1f}%"></div></td>'
                    f'<td class="acc">{fmt(scores.acc[c])}</td><td class="pixels">{count(scores.target[c])}</td></tr>')
    return '<table class="classes">' + "".join(rows) + "</table>"


def _pairs_section(pairs, names: list[str]) -> str:
    rule = (f"The confusions that take at least {CONFUSED_MIN_SHARE:.0%} of the true class's pixels, "
            f"at most {CONFUSED_PAIRS}, largest first; the heat map below shows them all.")
    if not pairs:
        return f"<p>{rule}</p><p>None: no class lost that much to another.</p>"
    rows = [_row(["ground truth", "predicted as", "pixels", "share of the true class"], "th")]
    rows += [_row([html.escape(names[r]), html.escape(names[c]), count(pixels), f"{share:.4f}"])
             for r, c, pixels, share in pairs]
    return f'<p>{rule}</p><table class="pairs">' + "".join(rows) + "</table>"


def _keys(pairs) -> str:
    return "".join(f'<span class="key">{_swatch(rgb)}{html.escape(what)}</span>' for rgb, what in pairs)


def _legend(names: list[str], colors: np.ndarray) -> str:
    """The colours of the prediction and truth panels (the truth's ignored pixels too), and of the error map."""
    classes = _keys([(colors[c], names[c]) for c in range(len(names))] + [(TRUTH_IGNORED_RGB, "ignored (truth)")])
    errors = _keys([(WRONG_RGB, "wrong"), (IGNORED_RGB, "ignored")])
    return f'<p class="legend">Classes: {classes}<br>Error map: {errors}; correct pixels show the image dimmed</p>'


def _worst_section(worst: list[ImageScore], asked: int, vis_folder: str, names: list[str],
                   colors: np.ndarray) -> str:
    """The worst images with their scores and panels; nothing at all when none were asked for."""
    if asked == 0:
        return ""
    if not worst:
        return "<h2>The worst images</h2><p>No image ranked: no image has a valid pixel.</p>"
    captions = '<div class="columns">' + "".join(f"<span>{c}</span>" for c in PANEL_COLUMNS) + "</div>"
    parts = [f"<h2>The {len(worst)} worst images, by mIoU</h2>",
             f"<p>Each row: {' | '.join(PANEL_COLUMNS)}. Click a row to enlarge it, again to shrink it.</p>",
             _legend(names, colors)]
    for rank, s in enumerate(worst, start=1):
        parts.append(f'<div class="worst" data-name="{html.escape(s.name)}"><h3>{rank}. {html.escape(s.name)}</h3>'
                     f'<p>mIoU <span class="miou">{fmt(s.miou)}</span>, pixel accuracy '
                     f'<span class="acc">{fmt(s.pixel_acc)}</span>, valid pixels {count(s.valid)}</p>{captions}'
                     f'<img src="{quote(f"{vis_folder}/{s.name}.png")}" alt="{html.escape(s.name)}" '
                     f'title="click to enlarge" onclick="this.classList.toggle(\'zoomed\')"></div>')
    return "".join(parts)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}
td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #ddd}.barcell{width:16em}
.bar{background:#4a7ebb;height:0.9em}
.swatch{display:inline-block;width:0.9em;height:0.9em;margin-right:0.4em;border:1px solid #888;vertical-align:middle}
.key{white-space:nowrap}.key+.key{margin-left:1em}td.pixels{text-align:right}
.means b{font-size:1.3em;margin-right:1.5em}img{max-width:100%;image-rendering:pixelated}
.worst img{width:100%;cursor:zoom-in}.columns{display:grid;grid-template-columns:repeat(4,1fr);font-weight:bold}
.worst img.zoomed{position:fixed;inset:0;width:100vw;height:100vh;object-fit:contain;background:rgba(0,0,0,.85);
z-index:1;cursor:zoom-out}"""


def write_report(path: Path, run: dict[str, str], scores: SegScores, names: list[str], colors: np.ndarray,
                 conf: np.ndarray, worst: list[ImageScore], asked: int, heatmap: str, vis_folder: str,
                 files: list[str]) -> None:
    """The static page: `run` (label -> value) describes the run; `asked` is TEST.report_worst, of
    which `worst` are the images ranked; heatmap, vis_folder and files are paths relative to the
    page's folder."""
    run_rows = "".join(_row([html.escape(k), html.escape(str(v))]) for k, v in run.items())
    links = " ".join(f'<a href="{quote(f)}">{html.escape(f)}</a>' for f in files)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Evaluation report</title><style>{STYLE}</style></head><body>
<h1>Evaluation report</h1>
<table class="run">{run_rows}</table>
<p>Files: {links}</p>
<p class="means">mIoU <b id="mIoU">{fmt(scores.miou)}</b> mAcc <b id="mAcc">{fmt(scores.macc)}</b>
allAcc <b id="allAcc">{fmt(scores.allacc)}</b></p>
<h2>Per-class scores, by IoU</h2>
{_class_table(scores, names, colors)}
<h2>Most-confused class pairs</h2>
{_pairs_section(confused_pairs(conf), names)}
<h2>Confusion matrix</h2>
<p>Rows are the true classes, columns the predictions; a cell is the share of the row's pixels.</p>
<img src="{quote(heatmap)}" alt="confusion matrix">
{_worst_section(worst, asked, vis_folder, names, colors)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def write_evaluation_report(save: Path, cfg, config_path: str, dataset, per_image: list[ImageScore],
                            conf: np.ndarray, scores: SegScores, names: list[str], colors: np.ndarray | None) -> None:
    """Everything test.py writes beyond metrics.json on a labelled split: per_image.csv,
    confusion.png, vis/<name>.png (image | prediction | truth | errors) for the TEST.report_worst
    worst images, read back from save/gray, and report.html linking them."""
    colors = colors if colors is not None else voc_palette(cfg.classes)
    write_per_image_csv(save / "per_image.csv", per_image)
    draw_confusion(save / "confusion.png", conf, names)
    worst = worst_images(per_image, cfg.report_worst)
    for s in worst:
        image, label, _ = dataset.load_raw(s.index)
        pred = read_label(str(save / "gray" / f"{s.name}.png"))
        panel = side_by_side(image, colorize(pred, colors), colorize(label, colors),
                             error_map(image, pred, label, cfg.ignore_label))
        write_png(save / "vis" / f"{s.name}.png", panel)
    run = {"config": config_path, "model": evaluated_network(cfg),
           "network": f"{ARCH_NAMES.get(cfg.arch, cfg.arch)}, ResNet-{cfg.layers}", "list": cfg.test_list,
           "images": len(per_image), "scales": cfg.scales, "flip": cfg.flip}
    write_report(save / "report.html", run, scores, names, colors, conf, worst, cfg.report_worst, "confusion.png",
                 "vis", ["metrics.json", "per_image.csv", "config.yaml"])
