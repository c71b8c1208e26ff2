"""tool/soak.py: the growth measure on made-up samples (fast), and a real soak run (marked `soak`,
excluded from CI; run with `python -m pytest -m soak`)."""
import importlib.util
import re
import sys

import pytest

from conftest import REPO_ROOT, run_tool

spec = importlib.util.spec_from_file_location("tool_soak", REPO_ROOT / "tool" / "soak.py")
soak = sys.modules["tool_soak"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(soak)


def samples(rss, fds, epochs_per_sample=0.5):
    return [soak.Sample(i * 0.2, int(i * epochs_per_sample), r, f) for i, (r, f) in enumerate(zip(rss, fds))]


def test_warm_up_is_ignored_and_a_flat_run_shows_no_growth():
    rss = [100.0, 300.0, 500.0] * 2 + [600.0, 601.0, 600.0, 599.0] * 10  # start-up spike, then steady noise
    fds = [3, 10, 30] * 2 + [18, 19, 18, 18] * 10
    growth = soak.measure_growth(samples(rss, fds), warmup_epochs=3)
    assert abs(growth.rss_mib) <= 1 and growth.fds == 0


def test_steady_growth_is_measured():
    rss = [600.0 + 2 * i for i in range(60)]  # 2 MiB a sample
    fds = [18 + i // 10 for i in range(60)]  # one descriptor leaked every 10 samples
    growth = soak.measure_growth(samples(rss, fds), warmup_epochs=3)
    assert growth.rss_mib == pytest.approx(2 * (54.5 - 10.5))  # medians of samples 50..59 and 6..15
    assert growth.fds >= 4


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="only 4 samples after 3 warm-up epochs"):
        soak.measure_growth(samples([1.0] * 10, [1] * 10), warmup_epochs=3)


def test_help_describes_the_limits():
    out = run_tool("soak.py", "--help")
    assert out.returncode == 0 and "--max-rss-growth-mib" in out.stdout and "--max-fd-growth" in out.stdout


@pytest.mark.soak
def test_soak_run_does_not_grow(tmp_path):
    out = run_tool("soak.py", "--epochs", "60", "--workdir", str(tmp_path), timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = re.search(r"growth ([-+.\d]+), limit .* fds .* \(growth ([-+.\d]+), limit", out.stdout)
    assert summary, out.stdout[-3000:]
    rss_growth, fd_growth = map(float, summary.groups())
    assert rss_growth <= 64 and fd_growth <= 4
    assert (tmp_path / "model" / "train_epoch_60.pth").is_file()
