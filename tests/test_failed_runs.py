"""A failed run says so where the user looks later: every tool's log file ends with the line the
terminal showed (util.cli.run_main), and tool/test.py failing before any prediction leaves no
result folder that would pass for a finished evaluation."""
import logging

import pytest

from conftest import assert_one_line_error, closed_port_url, run_tool, write_config
from util.cli import run_main, setup_logging
from util.errors import ConfigError


@pytest.fixture
def log_file(tmp_path):
    yield tmp_path / "run.log"
    setup_logging()  # let go of the file


@pytest.mark.parametrize("error, status, last", [
    (ConfigError("TRAIN.base_lr is -1; expected a positive learning rate"), 2,
     "error: TRAIN.base_lr is -1; expected a positive learning rate"),
    (ZeroDivisionError("a bug"), None, "ZeroDivisionError: a bug"),  # a traceback: its last line
])
def test_the_log_ends_with_what_the_terminal_showed(error, status, last, log_file, capsys):
    def main():
        setup_logging(log_file)
        logging.getLogger("tool").info("working")
        raise error

    with pytest.raises(SystemExit if status else ZeroDivisionError) as ended:
        run_main(main)
    if status:
        assert ended.value.code == status and capsys.readouterr().err.strip() == last
    assert log_file.read_text().splitlines()[-1].endswith(last)


def test_an_evaluation_failing_at_once_leaves_no_result_folder(tiny_toy, tmp_path):
    url = closed_port_url("model-0123abcd.pth")  # the download is refused
    config = write_config(tmp_path / "cfg.yaml", tiny_toy, TEST={"model_path": url})
    fresh = tmp_path / "result"
    out = run_tool("test.py", f"--config={config}", env={"TORCH_HOME": str(tmp_path / "t")})
    assert_one_line_error(out, "cannot download", url)
    assert not fresh.exists()

    earlier = tmp_path / "earlier"  # a folder of an earlier evaluation keeps its files; the new log says what failed
    earlier.mkdir()
    (earlier / "metrics.json").write_text("{}")
    out = run_tool("test.py", f"--config={config}", "TEST.save_folder", str(earlier),
                   env={"TORCH_HOME": str(tmp_path / "t")})
    seen = assert_one_line_error(out, "cannot download")
    (log,) = earlier.glob("test-*.log")
    assert log.read_text().splitlines()[-1].endswith(seen) and (earlier / "metrics.json").read_text() == "{}"
