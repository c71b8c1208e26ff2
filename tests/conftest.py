"""Test set-up: repository root importable, modest threads, a tiny toy dataset and config writer."""
import contextlib
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
torch.set_num_threads(2)

from util.toy_data import generate_toy_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Tests not marked gpu run on the CPU on a GPU machine too: their exact-equality checks assume
    CPU arithmetic, and their two-process runs must not need two GPUs (run_tool hides CUDA as well)."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory) -> Path:
    """A toy dataset small enough for end-to-end runs: 16 train and 8 val images of 48-64 px."""
    root = tmp_path_factory.mktemp("toy")
    generate_toy_dataset(root, seed=0, n_train=16, n_val=8, size_range=(48, 64))
    return root


@pytest.fixture(scope="session")
def checkpoint(tiny_toy, tmp_path_factory) -> Path:
    """A random 6-class layers-18 PSPNet for write_config's configs, saved as semseg does:
    {'state_dict': module.-prefixed keys}."""
    from model import build_model
    from util.config import load_config
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model(load_config(write_config(folder / "cfg.yaml", tiny_toy)))
    path = folder / "model.pth"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def write_config(path: Path, data_root: Path, **sections) -> Path:
    """A layers-18 PSPNet config on `data_root`; keyword sections override (DATA={...}, TRAIN={...})."""
    import yaml
    cfg = {
        "DATA": {"data_root": str(data_root), "train_list": str(data_root / "train.txt"),
                 "val_list": str(data_root / "val.txt"), "classes": 6},
        "TRAIN": {"arch": "psp", "layers": 18, "train_h": 33, "train_w": 33, "batch_size": 4,
                  "batch_size_val": 4, "base_lr": 0.01, "epochs": 2, "manual_seed": 7, "print_freq": 1,
                  "workers": 0, "dropout": 0.0, "save_path": str(path.parent / "model"),
                  "pretrained_backbone": "none"},
        "TEST": {"test_list": str(data_root / "val.txt"), "base_size": 64, "test_h": 33, "test_w": 33,
                 "save_folder": str(path.parent / "result"),
                 "names_path": str(data_root / "toy_names.txt"), "colors_path": str(data_root / "toy_colors.txt")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # the environment of scripts that tests run on the CPU


def run_tool(script: str, *args: str, launcher: list[str] | None = None, timeout: float = 300,
             env: dict | None = None, cuda: bool = False) -> subprocess.CompletedProcess:
    """Run tool/<script> from the repository root as a user would, capturing its output; on the
    CPU unless cuda=True."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if cuda else CPU_ONLY), **(env or {})}
    cmd = (launcher or [sys.executable]) + [str(REPO_ROOT / "tool" / script), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def assert_one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user mistake: exit status 2 and exactly one `error: ...` line on stderr holding each fragment."""
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@contextlib.contextmanager
def serve_folder(folder: Path):
    """An http.server on 127.0.0.1 (a free port) serving `folder`; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def closed_port_url(path: str) -> str:
    """A URL on 127.0.0.1 where nothing listens: what a download sees offline."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"
