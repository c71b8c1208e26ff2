"""The evaluation report (util/report.py, written by tool/test.py): per-image scores, the
confusion matrix, the worst images and report.html, checked against independent recomputations."""
import csv
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
import torch

from conftest import run_tool, write_config
from model import build_model
from util.config import load_config
from util.errors import ConfigError
from util.metrics import scores_from_confusion
from util.report import (CONFUSED_MIN_SHARE, CONFUSED_PAIRS, IGNORED_RGB, WRONG_RGB, ImageScore, confused_pairs,
                         draw_confusion, error_map, heatmap_classes, image_score, worst_images, write_report)
from util.metrics import confusion_matrix
from util.palette import colorize

WORST = 3


def read_png(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def recomputed_scores(pred: np.ndarray, label: np.ndarray, ignore: int = 255) -> tuple[float, float, int]:
    """Pixel accuracy, mIoU over the classes in truth or prediction, valid pixels: straight from
    the definition, without the confusion matrix."""
    valid = label != ignore
    p, t = pred[valid], label[valid]
    present = sorted(set(np.unique(p).tolist()) | set(np.unique(t).tolist()))
    ious = [np.sum((p == c) & (t == c)) / np.sum((p == c) | (t == c)) for c in present]
    return float(np.mean(p == t)), float(np.mean(ious)), int(valid.sum())


def test_image_score_by_hand():
    label = np.array([[0, 0, 1, 255], [2, 2, 1, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 3], [2, 0, 1, 3]], dtype=np.uint8)  # class 3 only where ignored
    score = image_score(7, "x", confusion_matrix(pred, label, 4, 255))
    # class 0: 1 / 3 pixels in union, class 1: 2 / 3, class 2: 1 / 2; class 3 is in no valid pixel
    assert (score.index, score.name, score.valid) == (7, "x", 6)
    assert score.pixel_acc == pytest.approx(4 / 6)
    assert score.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    empty = image_score(0, "all ignored", confusion_matrix(pred, np.full_like(label, 255), 4, 255))
    assert empty.valid == 0 and math.isnan(empty.miou)


def test_worst_images_rank_by_miou_then_accuracy_then_list_order():
    scores = [ImageScore(0, "a", 0.9, 0.5, 10), ImageScore(1, "b", 0.8, 0.2, 10),
              ImageScore(2, "c", 0.7, 0.5, 10), ImageScore(3, "d", float("nan"), float("nan"), 0),
              ImageScore(4, "e", 0.8, 0.2, 10)]
    assert [s.name for s in worst_images(scores, 3)] == ["b", "e", "c"]
    assert [s.name for s in worst_images(scores, 10)] == ["b", "e", "c", "a"]  # no score, no rank
    assert worst_images(scores, 0) == []


def test_negative_report_worst_is_refused(tiny_toy, tmp_path):
    with pytest.raises(ConfigError, match=r"TEST.report_worst is -1 \(override\).*expected 0 or a positive"):
        load_config(write_config(tmp_path / "cfg.yaml", tiny_toy), ["TEST.report_worst", "-1"])


def test_confused_pairs_heatmap_classes_and_error_map(tmp_path):
    conf = np.array([[50, 5, 0], [20, 10, 1], [0, 0, 0]])
    assert confused_pairs(conf) == [(1, 0, 20, 20 / 31), (0, 1, 5, 5 / 55), (1, 2, 1, 1 / 31)]
    big = np.diag(np.arange(1, 151)) * 100
    big[7, 9], big[120, 3], big[44, 44] = 30, 5, 0
    assert heatmap_classes(big, limit=3) == [3, 7, 9]  # then 120 (5 errors) is left out
    assert heatmap_classes(conf, limit=3) == [0, 1, 2]
    draw_confusion(tmp_path / "c.png", big, [f"class {i}" for i in range(150)])
    assert read_png(tmp_path / "c.png").shape[2] in (3, 4)

    image = np.full((1, 3, 3), 200.0, dtype=np.float32)
    errors = error_map(image, np.array([[0, 1, 2]]), np.array([[0, 2, 255]]), 255)
    assert errors[0, 0].tolist() == [100, 100, 100]  # right: the image, dimmed
    assert errors[0, 1].tolist() == list(WRONG_RGB) and errors[0, 2].tolist() == list(IGNORED_RGB)


def test_confused_pairs_are_the_few_that_matter():
    """At most CONFUSED_PAIRS pairs, none under CONFUSED_MIN_SHARE of its true class: a 0.2% share is left out."""
    conf = np.diag([10_000] * 14)
    for truth in range(13):
        conf[truth, truth + 1] = 500 + 10 * truth  # 5% and more of the row: all matter, the 10 largest shown
    conf[13, 0] = 20  # 0.2% of class 13
    pairs = confused_pairs(conf)
    assert len(pairs) == CONFUSED_PAIRS == 10 and min(share for *_, share in pairs) >= CONFUSED_MIN_SHARE == 0.01
    assert [(r, c) for r, c, *_ in pairs] == [(r, r + 1) for r in range(12, 2, -1)]
    assert (13, 0) not in [(r, c) for r, c, *_ in confused_pairs(conf, limit=100)]


def dark_cells_box(png: Path) -> tuple[int, int]:
    """(height, width) of the largest patch of the heat map's darkest colour (share 1.0) in a PNG."""
    import matplotlib
    dark = np.array(matplotlib.colormaps["Blues"](1.0)[:3]) * 255
    rgb = read_png(png)[..., 2::-1].astype(float)  # BGR(A) -> RGB
    mask = (np.abs(rgb - dark).max(axis=2) <= 3).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    largest = max(range(1, count), key=lambda i: stats[i, cv2.CC_STAT_AREA])
    return stats[largest, cv2.CC_STAT_HEIGHT], stats[largest, cv2.CC_STAT_WIDTH]


def test_heat_map_png_has_the_truth_in_rows_and_the_prediction_in_columns(tmp_path):
    """Every true class predicted as class 0: share 1.0 fills the first column, a tall patch; drawn
    transposed it would fill the first row, a wide one."""
    conf = np.array([[40, 0, 0], [30, 0, 0], [20, 0, 0]])
    draw_confusion(tmp_path / "c.png", conf, ["a", "b", "c"])
    height, width = dark_cells_box(tmp_path / "c.png")
    assert height > 2.5 * width, (height, width)


def test_report_without_worst_images_has_no_worst_heading(tmp_path):
    conf = np.array([[1500, 20], [3, 2000]])
    colors = np.array([[10, 20, 30], [200, 100, 0]])
    write_report(tmp_path / "r.html", {}, scores_from_confusion(conf), ["a", "b"], colors, conf, [], 0, "c.png", "vis",
                 [])
    page = (tmp_path / "r.html").read_text()
    assert "worst images" not in page.lower() and "<h2>" in page and "1,520" in page and "2,003" in page
    assert 'data-rgb="10,20,30"' in page and 'data-rgb="200,100,0"' in page
    write_report(tmp_path / "r.html", {}, scores_from_confusion(conf), ["a", "b"], colors, conf, [], 5, "c.png", "vis",
                 [])
    assert "No image ranked" in (tmp_path / "r.html").read_text()


@pytest.fixture(scope="module")
def evaluated(tiny_toy, tmp_path_factory):
    """One test.py run of a random layers-18 PSPNet on the 8 toy validation images."""
    folder = tmp_path_factory.mktemp("report")
    cfg_path = write_config(folder / "cfg.yaml", tiny_toy)
    torch.manual_seed(1)
    model = build_model(load_config(cfg_path))
    torch.save({"state_dict": model.state_dict()}, folder / "model.pth")
    cfg_path = write_config(folder / "cfg.yaml", tiny_toy, TEST={"model_path": str(folder / "model.pth"),
                                                              "scales": [1.0], "report_worst": WORST})
    out = run_tool("test.py", f"--config={cfg_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    return folder / "result", out


def read_per_image(result: Path) -> dict[str, dict]:
    with open(result / "per_image.csv", newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_per_image_scores_equal_a_recomputation_from_the_gray_pngs(evaluated, tiny_toy):
    result, out = evaluated
    rows = read_per_image(result)
    names = [line.split()[0].split("/")[-1][:-4] for line in (tiny_toy / "val.txt").read_text().splitlines()]
    assert list(rows) == names  # list order
    for name in names:
        acc, miou, valid = recomputed_scores(read_png(result / "gray" / f"{name}.png"),
                                             read_png(tiny_toy / "labels" / "val" / f"{name}.png"))
        row = rows[name]
        assert int(row["valid_pixels"]) == valid
        assert float(row["pixel_acc"]) == pytest.approx(acc, abs=1e-12)
        assert float(row["miou"]) == pytest.approx(miou, abs=1e-12)
    assert "report written to" in out.stdout and " s\n" in out.stdout.split("report written to")[1]


def test_confusion_matrix_sums_to_the_valid_pixels(evaluated, tiny_toy):
    result, _ = evaluated
    metrics = json.loads((result / "metrics.json").read_text())
    counts = np.array(metrics["confusion"]["counts"])
    labels = [read_png(p) for p in sorted((tiny_toy / "labels" / "val").glob("*.png"))]
    assert counts.shape == (6, 6)
    assert counts.sum() == sum(int((label != 255).sum()) for label in labels)
    assert counts.sum() == sum(int(r["valid_pixels"]) for r in read_per_image(result).values())
    assert counts.sum(axis=1).tolist() == [c["target"] for c in metrics["classes"]]
    assert np.diag(counts).tolist() == [c["intersection"] for c in metrics["classes"]]


class PageParser(HTMLParser):
    """The links of a page, and the text of elements by id, class and data-* attribute."""

    def __init__(self):
        super().__init__()
        self.links, self.by_id, self.rows, self.worst = [], {}, [], []
        self._open = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.links.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if "data-class" in attrs:
            self.rows.append({"class": int(attrs["data-class"])})
        if "data-name" in attrs:
            self.worst.append({"name": attrs["data-name"]})
        self._open = attrs.get("id") or attrs.get("class")

    def handle_data(self, data):
        if self._open in ("mIoU", "mAcc", "allAcc"):
            self.by_id[self._open] = data
        elif self._open in ("iou", "acc") and self.rows and self.rows[-1].get(self._open) is None \
                and not self.worst:
            self.rows[-1][self._open] = data
        elif self._open in ("miou", "acc") and self.worst:
            self.worst[-1][self._open] = data
        self._open = None


def four(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def test_report_parses_links_existing_files_and_shows_the_json_numbers(evaluated):
    result, _ = evaluated
    metrics = json.loads((result / "metrics.json").read_text())
    page = PageParser()
    page.feed((result / "report.html").read_text(encoding="utf-8"))
    page.close()
    assert "confusion.png" in page.links and len([s for s in page.links if s.startswith("vis/")]) == WORST
    for link in page.links:
        assert not link.startswith(("http:", "https:", "/")) and (result / unquote(link)).is_file(), link
    assert page.by_id == {k: four(metrics[k]) for k in ("mIoU", "mAcc", "allAcc")}
    by_class = {c["id"]: c for c in metrics["classes"]}
    assert sorted(r["class"] for r in page.rows) == list(range(6))
    for row in page.rows:
        assert (row["iou"], row["acc"]) == (four(by_class[row["class"]]["iou"]), four(by_class[row["class"]]["acc"]))
    shown = [by_class[r["class"]]["iou"] for r in page.rows]
    assert shown == sorted(shown, key=lambda x: -1 if x is None else -x)


def test_worst_images_are_the_k_lowest_by_miou(evaluated):
    result, _ = evaluated
    rows = read_per_image(result)
    lowest = sorted(rows, key=lambda n: (float(rows[n]["miou"]), float(rows[n]["pixel_acc"])))[:WORST]
    page = PageParser()
    page.feed((result / "report.html").read_text(encoding="utf-8"))
    assert [w["name"] for w in page.worst] == lowest
    assert [w["miou"] for w in page.worst] == [four(float(rows[n]["miou"])) for n in lowest]
    assert sorted(p.stem for p in (result / "vis").glob("*.png")) == sorted(lowest)
    for name in lowest:  # image | prediction | truth | errors, 4 px bars between them
        panel, gray = read_png(result / "vis" / f"{name}.png"), read_png(result / "gray" / f"{name}.png")
        assert panel.shape == (gray.shape[0], 4 * gray.shape[1] + 12, 3)


def test_report_shows_class_colours_a_legend_and_counts_with_separators(evaluated, tiny_toy):
    result, _ = evaluated
    page = (result / "report.html").read_text(encoding="utf-8")
    metrics = json.loads((result / "metrics.json").read_text())
    colors = [line.split() for line in (tiny_toy / "toy_colors.txt").read_text().splitlines()]
    rows = re.findall(r'<tr data-class="(\d+)"><td><span class="swatch" data-rgb="([\d,]+)".*?'
                      r'<td class="pixels">([\d,]+)</td>', page)
    assert len(rows) == 6
    for c, rgb, pixels in rows:
        assert rgb.split(",") == colors[int(c)]  # the class's own colour beside its name
        assert pixels == f"{metrics['classes'][int(c)]['target']:,}"
    assert any("," in pixels for *_, pixels in rows)
    legend = page.split('<p class="legend">')[1].split("</p>")[0]
    assert page.index('class="legend"') < page.index('class="worst"')  # by the worst images
    ignored_in_truth = colorize(np.array([[255]], np.uint8), np.array(colors, int))[0, 0]  # the truth panel's
    assert re.findall(r'data-rgb="([\d,]+)"', legend) == [",".join(c) for c in colors] + [
        ",".join(map(str, ignored_in_truth)), ",".join(map(str, WRONG_RGB)), ",".join(map(str, IGNORED_RGB))]
    assert re.search(r"\.key\{[^}]*margin-right", page) is None  # no gap between the last key and the text after it


def test_worst_image_panels_are_full_width_captioned_and_enlarge_on_click(evaluated):
    result, _ = evaluated
    page = (result / "report.html").read_text(encoding="utf-8")
    rows = page.split('<div class="worst"')[1:]
    assert len(rows) == WORST
    for row in rows:
        captions = re.search(r'<div class="columns">(.*?)</div>\s*<img', row)
        assert captions and re.findall(r"<span>(.*?)</span>", captions.group(1)) == [
            "image", "prediction", "ground truth", "errors"]
        assert "onclick=\"this.classList.toggle('zoomed')\"" in row
    assert re.search(r"\.worst img\{width:100%", page) and re.search(r"\.worst img\.zoomed\{position:fixed", page)
