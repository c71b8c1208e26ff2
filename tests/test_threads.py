"""util/threads.py: cores from affinity and cgroup quota, thread counts, OpenMP wait settings and the
data-worker cap; user settings win. No timing here (tool/benchmark.py --contention measures)."""
import logging
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import util.threads as threads
from conftest import REPO_ROOT, write_config
from util.distributed import default_workers


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 1.5),                                  # cgroup v2 quota
    ({"cpu.max": "max 100000\n"}, None),                                    # v2, no quota
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),   # v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1, joint
    ({}, None),                                                             # no cgroup files
])
def test_cgroup_cpu_limit_reads_v2_and_v1_quotas(tmp_path, files, expected):
    for name, text in files.items():
        write(tmp_path / name, text)
    assert threads.cgroup_cpu_limit(tmp_path) == expected


@pytest.mark.parametrize("affinity, quota, expected", [({0, 1, 2, 3}, None, 4), ({0, 1, 2, 3}, 1.5, 2),
                                                       ({5}, 8.0, 1), ({0, 1}, 0.2, 1)])
def test_usable_cores_is_the_affinity_mask_lowered_to_the_quota(affinity, quota, expected):
    assert threads.usable_cores(affinity, quota) == expected


@pytest.mark.parametrize("env, expected", [({}, {"GOMP_SPINCOUNT": threads.SPIN_COUNT}),
                                           ({"OMP_WAIT_POLICY": "ACTIVE"}, {}),
                                           ({"GOMP_SPINCOUNT": "300000"}, {})])
def test_openmp_wait_defaults_leave_a_user_setting_alone(env, expected):
    assert threads.openmp_defaults(env) == expected


@pytest.mark.parametrize("env, cores, processes, expected", [({}, 2, 1, 2), ({}, 16, 8, 2), ({}, 2, 4, 1),
                                                             ({"OMP_NUM_THREADS": "3"}, 2, 1, None),
                                                             ({"MKL_NUM_THREADS": "1"}, 8, 1, None)])
def test_intra_op_threads_per_process_unless_the_user_set_them(env, cores, processes, expected):
    assert threads.intra_op_threads(env, cores, processes) == expected


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda root=threads.CGROUP_ROOT: None)
    monkeypatch.delenv(threads.FORCE_WORKERS, raising=False)


def test_workers_are_capped_at_the_cores_with_one_notice(two_cores):
    workers, notice = default_workers(16, 1)
    assert workers == 2
    assert notice == ("TRAIN.workers 16 gives this process 16 data workers, but it may use 2 CPU core(s); "
                      "starting 2 (set SEMSEG_FORCE_WORKERS=1 to start 16)")
    assert default_workers(2, 1) == (2, None) and default_workers(-1, 1) == (2, None)
    assert default_workers(0, 1) == (0, None)
    workers, notice = default_workers(16, 2)  # 8 per process, one core each
    assert workers == 1 and "TRAIN.workers 16 (per node, 2 processes)" in notice


def test_forced_workers_are_kept(two_cores):
    assert default_workers(16, 1, env={threads.FORCE_WORKERS: "1"}) == (16, None)


def test_evaluation_logs_the_worker_notice_once(two_cores, tiny_toy, tmp_path, caplog):
    from tool.test import ScaledImages, make_loader
    from util.config import load_config
    from util.dataset import dataset_from_config
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_toy, TRAIN={"workers": 16}))
    images = ScaledImages(dataset_from_config(cfg, cfg.test_list, "val"), list(range(8)), [64])
    with caplog.at_level(logging.INFO):
        loader = make_loader(cfg, SimpleNamespace(device=torch.device("cpu"), is_main=True), images)
    assert loader.num_workers == 2
    notices = [r.getMessage() for r in caplog.records if "SEMSEG_FORCE_WORKERS" in r.getMessage()]
    assert len(notices) == 1 and notices[0].startswith("TRAIN.workers 16 ") and caplog.records[0].levelname == "WARNING"


class ThreadCounts(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        import cv2
        return torch.tensor([cv2.getNumThreads(), torch.get_num_threads()])


def test_data_workers_run_single_threaded():
    loader = DataLoader(ThreadCounts(), batch_size=None, num_workers=1, worker_init_fn=threads.init_data_worker)
    assert next(iter(loader)).tolist() == [1, 1]


PROBE = ("import os, sys; sys.path.insert(0, {root!r}); import util.threads as t; t.set_openmp_defaults(); "
         "import torch; n = t.set_process_threads(); import cv2; "
         "print(t.usable_cores(), n, cv2.getNumThreads(), os.environ.get('GOMP_SPINCOUNT'))")


def probe(env: dict, launcher: list[str] = ()) -> list[str]:
    """(usable cores, PyTorch threads, OpenCV threads, GOMP_SPINCOUNT) of a fresh tool-like process."""
    clean = {k: v for k, v in os.environ.items() if k not in (*threads.THREAD_VARIABLES, *threads.WAIT_VARIABLES)}
    out = subprocess.run([*launcher, sys.executable, "-c", PROBE.format(root=str(REPO_ROOT))], capture_output=True,
                         text=True, env={**clean, **env}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and 2 cores")
def test_threads_follow_the_affinity_mask():
    assert probe({}, ["taskset", "-c", "0"])[:3] == ["1", "1", "1"]
    assert probe({}, ["taskset", "-c", "0,1"])[:3] == ["2", "2", "2"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_user_thread_and_wait_settings_are_honoured():
    cores, torch_threads, _, spin = probe({"OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "12345"})
    assert int(cores) >= 2 and torch_threads == "1" and spin == "12345"  # the plan alone would take 2+
    assert probe({"OMP_WAIT_POLICY": "PASSIVE"})[3] == "None"
    assert probe({})[3] == threads.SPIN_COUNT
