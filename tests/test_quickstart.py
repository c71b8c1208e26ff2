"""The quick start's number in the README is what the code produces: a scaled-down run of the same
pipeline (the shipped toy config, tool/train.py then tool/test.py) on the tiny toy set, one thread,
whose mIoU the README quotes. A change that moves the score must move the text too."""
import json
import re

from conftest import REPO_ROOT, run_tool

CONFIG = "config/toy/toy_pspnet18.yaml"
# the README's paragraph that starts "**Scaled-down check**" and quotes the mIoU in bold
# One thread, and PyTorch's and oneDNN's kernels held to AVX2, which narrows how far CPUs differ but
# does not remove it: on the version-2 toy data 0.2161 (AVX-512 EPYC, uncapped), 0.2236 (that EPYC
# capped to AVX2) and 0.2168 (an AVX2-only EPYC) were measured; the version-3 data gives 0.2447 on
# the AVX2-only EPYC. So the README's number must hold within TOLERANCE, about three times that
# spread: a change that really moves the score still fails here.
TOLERANCE = 0.02
PORTABLE_KERNELS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2",
                    "ONEDNN_MAX_CPU_ISA": "AVX2"}
QUOTED = re.compile(r"\*\*Scaled-down check\*\*(?:(?!\n\n).)*?mIoU \*\*(\d\.\d{4})\*\*", re.S)


def scaled_down_overrides(toy, exp) -> list[str]:
    """The quick start's config on 16 training and 8 validation images of 48-64 px: 10 epochs of
    33-px crops in batches of 4 (40 iterations), evaluated at 2 scales with flip."""
    return ["DATA.data_root", str(toy), "DATA.train_list", str(toy / "train.txt"), "DATA.val_list",
            str(toy / "val.txt"), "TEST.test_list", str(toy / "val.txt"), "TEST.names_path", str(toy / "toy_names.txt"),
            "TEST.colors_path", str(toy / "toy_colors.txt"), "TRAIN.epochs", "10", "TRAIN.train_h", "33",
            "TRAIN.train_w", "33", "TRAIN.batch_size", "4", "TRAIN.workers", "0", "TRAIN.save_path", str(exp / "model"),
            "TEST.base_size", "64", "TEST.test_h", "33", "TEST.test_w", "33", "TEST.scales", "[0.75, 1.0]",
            "TEST.model_path", str(exp / "model" / "train_epoch_10.pth"), "TEST.save_folder", str(exp / "result"),
            "TEST.report_worst", "0"]


def test_the_readme_quotes_the_score_of_the_scaled_down_quick_start(tiny_toy, tmp_path):
    overrides = scaled_down_overrides(tiny_toy, tmp_path)
    for script in ("train.py", "test.py"):
        out = run_tool(script, f"--config={CONFIG}", *overrides, env=PORTABLE_KERNELS)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    produced = json.loads((tmp_path / "result" / "metrics.json").read_text())["mIoU"]
    quoted = QUOTED.search((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    assert quoted, "README.md lost its '**Scaled-down check**' sentence with the mIoU in bold"
    assert abs(float(quoted.group(1)) - produced) <= TOLERANCE, (
        f"the scaled-down quick start gives mIoU {produced:.4f}; README.md says {quoted.group(1)} "
        f"(within {TOLERANCE} passes): update the README (and re-measure the full quick start)")
