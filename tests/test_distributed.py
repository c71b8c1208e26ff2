"""Launch detection, process-group helpers, evaluation shards and the global batch sampler."""
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from util import distributed as ud
from util.distributed import GlobalBatchSampler, LaunchInfo, detect_launch, shard_indices
from util.errors import ConfigError


# ---- launch detection -------------------------------------------------------------------------

SRUN_ENV = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "SLURM_NODELIST": "gpu[07-09,12]", "SLURM_JOB_ID": "42"}


def test_torchrun_env():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
           "MASTER_PORT": "1234"}
    assert detect_launch(env) == LaunchInfo("torchrun", 5, 1, 8, "10.0.0.2", 1234)


def test_torchrun_wins_over_slurm():
    env = {**SRUN_ENV, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert detect_launch(env).launcher == "torchrun"


def test_rank_without_master_addr_is_named():
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        detect_launch({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


def test_srun_env_derives_master_from_first_node():
    assert detect_launch(SRUN_ENV) == LaunchInfo("slurm", 3, 1, 4, "gpu07", 29500)


def test_srun_env_prefers_step_values_and_explicit_master():
    env = {**SRUN_ENV, "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_NODELIST": "n[3-5]",
           "MASTER_PORT": "4000"}
    assert detect_launch(env) == LaunchInfo("slurm", 3, 1, 6, "n3", 4000)
    env["MASTER_ADDR"] = "head"
    assert detect_launch(env).master_addr == "head"


def test_srun_env_uses_given_host_resolver():
    seen = []
    info = detect_launch(SRUN_ENV, first_host=lambda nodes: seen.append(nodes) or "resolved")
    assert info.master_addr == "resolved" and seen == ["gpu[07-09,12]"]


def test_sbatch_script_without_srun_is_single_process():
    batch_env = {key: value for key, value in SRUN_ENV.items() if key != "SLURM_STEP_ID"}
    assert detect_launch(batch_env) == LaunchInfo("single", 0, 0, 1, None, None)
    assert detect_launch({}).launcher == "single"


def test_bad_launch_values_name_the_variable():
    with pytest.raises(ConfigError, match="SLURM_PROCID='x'"):
        detect_launch({**SRUN_ENV, "SLURM_PROCID": "x"})
    with pytest.raises(ConfigError, match="SLURM_PROCID=4 is not in"):
        detect_launch({**SRUN_ENV, "SLURM_PROCID": "4"})
    no_nodes = {key: value for key, value in SRUN_ENV.items() if key != "SLURM_NODELIST"}
    with pytest.raises(ConfigError, match="node list"):
        detect_launch(no_nodes)


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[07-09,12],cpu1", "gpu07"), ("node[001-003]", "node001"), ("host1,host2", "host1"),
    ("solo", "solo"), ("rack[1-2]-n[3-4],x", "rack1-n3"), ("a[5],b[1-2]", "a5"),
])
def test_first_host_from_nodelist(nodelist, host):
    assert ud.first_host_from_nodelist(nodelist) == host


# ---- init and helpers -------------------------------------------------------------------------

def test_single_process_init_and_helpers_without_group():
    info = ud.init_distributed("gloo", env={})
    assert (info.rank, info.local_rank, info.world_size, info.is_main, info.distributed) == \
        (0, 0, 1, True, False)
    assert info.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not ud.is_distributed()
    assert ud.broadcast_object({"a": 1}) == {"a": 1}
    ud.barrier()
    ud.cleanup_distributed()


def test_backend_choice_is_checked():
    with pytest.raises(ConfigError, match="dist_backend: expected one of auto, nccl, gloo, got 'mpi'"):
        ud.init_distributed("mpi", env={})
    if not torch.cuda.is_available():  # semseg configs say nccl: they must run on CPU unedited
        assert ud._resolve_backend("nccl") == "gloo"
        assert ud.init_distributed("nccl", env={}).device.type == "cpu"


@pytest.mark.parametrize("train_gpu, current, expected", [
    ([0, 1], None, "0,1"),
    ([1], "2,3", "3"),  # indices count within what the scheduler made visible
    ([0, 1], "GPU-aa, GPU-bb, GPU-cc", "GPU-aa,GPU-bb"),
    ([0], "", ""),  # GPUs deliberately hidden stay hidden
])
def test_train_gpu_selects_within_the_visible_devices(train_gpu, current, expected):
    assert ud.visible_devices(train_gpu, current) == expected


def test_train_gpu_outside_the_visible_devices_is_named():
    with pytest.raises(ConfigError, match=r"TRAIN.train_gpu \[0, 2\]: \[2\] not among the 2 GPU\(s\) of "
                                          r"CUDA_VISIBLE_DEVICES=4,5"):
        ud.visible_devices([0, 2], "4,5")


@pytest.mark.parametrize("launcher, local_rank, count, expected", [
    ("torchrun", 1, 2, 1), ("slurm", 3, 1, 0), ("torchrun", 1, 1, None), ("slurm", 2, 2, None)])
def test_device_of_a_local_rank(monkeypatch, launcher, local_rank, count, expected):
    """srun --gpus-per-task shows each task one GPU; two torchrun processes on one GPU are refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    if expected is None:
        with pytest.raises(ConfigError, match=f"local rank {local_rank} has no GPU: this node shows {count}"):
            ud._select_device(local_rank, launcher)
    else:
        assert ud._select_device(local_rank, launcher) == torch.device("cuda", expected)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _srun_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
           "SLURM_STEP_ID": "0", "SLURM_NODELIST": "localhost", "MASTER_PORT": str(port)}
    info = ud.init_distributed("gloo", dist_timeout_s=60, env=env)
    total = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(total)
    received = ud.broadcast_object({"sender": rank})
    ud.barrier()
    seen = (info.rank, info.world_size, info.is_main, torch.distributed.get_world_size(),
            torch.distributed.get_rank(), total.item(), received["sender"])
    ud.cleanup_distributed()
    torch.save({"seen": seen, "group_left": not ud.is_distributed()}, f"{out_dir}/rank{rank}.pt")


def test_two_srun_processes_join_and_communicate(tmp_path):
    mp.spawn(_srun_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["seen"] == (rank, 2, rank == 0, 2, rank, 3.0, 0)
        assert result["group_left"]


# ---- evaluation shards ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 5, 16, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_once(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    merged = sorted(i for shard in shards for i in shard)
    assert merged == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shards_are_strided():
    assert shard_indices(7, 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="rank 3 is not in"):
        shard_indices(7, 3, 3)


# ---- global batch sampler ---------------------------------------------------------------------

def _steps(dataset_size, batch, world, accum, epoch=0, **kwargs):
    """Per optimiser step, the concatenation over ranks (in order) of their micro-batches."""
    per_rank = []
    for r in range(world):
        sampler = GlobalBatchSampler(dataset_size, batch, rank=r, world_size=world, seed=7,
                                     micro_batches_per_step=accum, **kwargs)
        sampler.set_epoch(epoch)
        micro = list(sampler)
        assert len(micro) == len(sampler)
        per_rank.append(micro)
    steps = len(per_rank[0]) // accum
    return [[key for r in range(world) for mb in per_rank[r][k * accum:(k + 1) * accum] for key in mb]
            for k in range(steps)]


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)])
def test_global_batches_do_not_depend_on_world_size_or_accumulation(world, accum):
    reference = _steps(30, 8, 1, 1, epoch=3)
    assert len(reference) == 3 and all(len(b) == 8 for b in reference)
    assert _steps(30, 8, world, accum, epoch=3) == reference
    sampler = GlobalBatchSampler(30, 8, rank=world - 1, world_size=world, micro_batches_per_step=accum)
    assert sampler.micro_batch_size == 8 // (world * accum)
    assert all(len(mb) == sampler.micro_batch_size for mb in sampler)


def test_epochs_differ_and_repeat_exactly():
    epoch0, epoch1 = _steps(24, 8, 1, 1, epoch=0), _steps(24, 8, 1, 1, epoch=1)
    assert epoch0 != epoch1
    assert {key[0] for batch in epoch1 for key in batch} == {1}
    assert sorted(i for _, i in sum(epoch1, [])) == list(range(24))
    assert _steps(24, 8, 2, 2, epoch=1) == epoch1
    sampler = GlobalBatchSampler(24, 8, seed=7)
    sampler.set_epoch(1)
    assert [key for batch in sampler for key in batch] == sum(epoch1, [])
    other_seed = GlobalBatchSampler(24, 8, seed=8)
    other_seed.set_epoch(1)
    assert list(other_seed) != list(sampler)


def test_no_shuffle_is_in_order_and_drop_last_false_keeps_tail():
    steps = _steps(11, 4, 2, 1, shuffle=False, drop_last=False)
    assert steps == [[(0, i) for i in range(0, 4)], [(0, i) for i in range(4, 8)],
                     [(0, i) for i in range(8, 11)]]
    assert len(GlobalBatchSampler(11, 4, drop_last=False)) == 3
    assert len(GlobalBatchSampler(11, 4, world_size=2, rank=1, micro_batches_per_step=2)) == 4


def test_sampler_configuration_errors_are_explained():
    with pytest.raises(ValueError, match="global batch size 10 is not divisible by world_size 4 "
                                         "x micro_batches_per_step 1 = 4"):
        GlobalBatchSampler(100, 10, rank=0, world_size=4)
    with pytest.raises(ValueError, match="world_size 2 x micro_batches_per_step 3 = 6"):
        GlobalBatchSampler(100, 8, rank=0, world_size=2, micro_batches_per_step=3)
    with pytest.raises(ValueError, match="last global batch would hold 1 samples"):
        GlobalBatchSampler(9, 4, world_size=2, drop_last=False)
    with pytest.raises(ValueError, match="no full global batch of 16"):
        GlobalBatchSampler(10, 16)


class _KeyDataset(Dataset):
    def __getitem__(self, key):
        epoch, index = key
        return torch.tensor([epoch, index])

    def __len__(self):
        return 12


def test_works_as_dataloader_batch_sampler():
    sampler = GlobalBatchSampler(12, 4, rank=1, world_size=2, seed=1)
    sampler.set_epoch(2)
    batches = list(DataLoader(_KeyDataset(), batch_sampler=sampler))
    assert [b.tolist() for b in batches] == [[[e, i] for e, i in mb] for mb in sampler]
    assert all(b.shape == (2, 2) for b in batches) and len(batches) == 3


@pytest.mark.parametrize("env, expected", [
    ({"LOCAL_WORLD_SIZE": "4"}, 4),
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NTASKS_PER_NODE": "2"}, 8),
    ({"SLURM_NTASKS_PER_NODE": "2"}, 2),
    ({}, 1),
])
def test_local_world_size_splits_workers_per_node(env, expected):
    assert ud.local_world_size(env) == expected
