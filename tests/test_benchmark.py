"""tool/benchmark.py runs and reports (it measures; no timing is asserted here)."""
import json

from conftest import run_tool, write_config


def test_quick_eval_and_psa_sections_write_tables_and_json(tmp_path):
    # The smallest image and window: bf16 is emulated on CPUs without native bf16, about 10x slower than float32.
    out = run_tool("benchmark.py", "--quick", "--only", "eval,psa", "--eval-size", "40x52", "--eval-crop", "33",
                   "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    assert [row["amp"] for row in result["evaluation"]] == ["off", "bf16"]  # one row per TEST.test_amp mode
    for evaluation in result["evaluation"]:
        assert evaluation["windows"] >= 1 and evaluation["ours_s"] > 0 and evaluation["reference_s"] > 0
        assert 0 <= evaluation["overhead_pct"] <= 100
    assert result["psa"]["loop"]["collect"]["speedup"] > 1
    assert "| model | image |" in out.stdout and "psa_mask" in out.stdout


def test_memory_section_reports_peak_growth(tmp_path):
    out = run_tool("benchmark.py", "--only", "memory", "--eval-size", "40x52", "--eval-crop", "33",
                   "--eval-scales", "0.5,1.0", "--json", str(tmp_path / "m.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    memory = json.loads((tmp_path / "m.json").read_text())["memory"]
    assert memory["scales"] == [0.5, 1.0] and memory["host_rss_growth_mib"] >= 0
    assert "host RSS +" in out.stdout


def test_onnx_section_compares_onnxruntime_with_pytorch(tmp_path):
    out = run_tool("benchmark.py", "--only", "onnx", "--eval-crop", "33", "--repeats", "1",
                   "--json", str(tmp_path / "o.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    onnx = json.loads((tmp_path / "o.json").read_text())["onnx"]
    assert onnx["pytorch_s"] > 0 and onnx["onnxruntime_s"] > 0 and onnx["max_abs_difference"] < 1e-4
    assert onnx["speedup"] == onnx["pytorch_s"] / onnx["onnxruntime_s"] and "| onnxruntime (s/window) |" in out.stdout


def test_int8_section_times_eager_fp32_and_int8_in_one_run(tiny_toy, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", tiny_toy)
    out = run_tool("benchmark.py", "--only", "int8", "--int8-configs", str(config), "--int8-size", "40x52",
                   "--repeats", "1", "--json", str(tmp_path / "q.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads((tmp_path / "q.json").read_text())["int8"]
    assert row["model"] == "PSPNet-18" and row["crop"] == 33 and row["windows"] == 4
    for kind in ("window", "image"):
        assert set(row["seconds"][kind]) == {"pytorch", "onnxruntime_fp32", "onnxruntime_int8"}
        assert all(seconds > 0 for seconds in row["seconds"][kind].values())
    assert "| onnxruntime int8 (s) |" in out.stdout and "sliding window (4 x2 flip)" in out.stdout


def test_contention_neighbour_is_started_and_stopped(monkeypatch):
    """--contention's busy process lives exactly as long as the measurement it surrounds."""
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")  # importing the tool would otherwise set it for later tests
    from tool.benchmark import busy_neighbour
    with busy_neighbour(False) as none:
        assert none is None
    with busy_neighbour(True) as neighbour:
        assert neighbour.poll() is None
    assert neighbour.poll() is not None
