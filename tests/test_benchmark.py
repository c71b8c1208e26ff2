"""tool/benchmark.py runs and reports (it measures; no timing is asserted here)."""
import json

from conftest import run_tool


def test_quick_eval_and_psa_sections_write_tables_and_json(tmp_path):
    out = run_tool("benchmark.py", "--quick", "--only", "eval,psa", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "b.json").read_text())
    evaluation = result["evaluation"][0]
    assert evaluation["windows"] >= 1 and evaluation["ours_s"] > 0 and evaluation["reference_s"] > 0
    assert 0 <= evaluation["overhead_pct"] <= 100
    assert result["psa"]["loop"]["collect"]["speedup"] > 1
    assert "| model | image |" in out.stdout and "psa_mask" in out.stdout
