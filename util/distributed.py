"""Process-group set-up and small collective helpers for the train / test scripts.

Launchers understood: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and srun
under SLURM (SLURM_PROCID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID, the node list).
Anything else is a single process without a process group; every helper here then does the
single-process thing, so scripts call them unconditionally.

Also the index plumbing that makes runs independent of the process count: `shard_indices` for
evaluation and `GlobalBatchSampler` for training.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from util.errors import ConfigError
from util.threads import capped_workers, usable_cores

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500
DEFAULT_TIMEOUT_S = 1800.0
BACKENDS = ("auto", "nccl", "gloo")
EPOCH_SEED_STRIDE = 1_000_003
RESTART_VARIABLE = "TORCHELASTIC_RESTART_COUNT"  # torchrun's count of group restarts (--max-restarts)


@dataclass(frozen=True)
class LaunchInfo:
    """Who started this process and where rank 0 listens. launcher: torchrun | slurm | single."""
    launcher: str
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None
    master_port: int | None


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and the device it computes on."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host_from_nodelist(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07', 'r[1-2]-n[3-4]' -> 'r1-n3'.

    Only the first name is needed, so each bracket group is replaced by its first number
    (zero padding kept, as SLURM writes it).
    """
    depth, end = 0, len(nodelist)
    for pos, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = pos
            break
    first = nodelist[:end].strip()
    host = re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)
    if not host or any(c in host for c in "[],"):
        raise ConfigError(f"cannot read a host name from SLURM node list {nodelist!r}")
    return host


def _scontrol_first_host(nodelist: str) -> str:
    """First host via `scontrol show hostnames`, falling back to our own parsing."""
    if shutil.which("scontrol"):
        try:
            listing = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                     capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.SubprocessError):
            listing = []
        if listing:
            return listing[0]
    return first_host_from_nodelist(nodelist)


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _checked(info: LaunchInfo, rank_var: str) -> LaunchInfo:
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise ConfigError(f"{info.launcher} launch: {rank_var}={info.rank} is not in "
                          f"[0, world size {info.world_size})")
    return info


def detect_launch(env: Mapping[str, str],
                  first_host: Callable[[str], str] = first_host_from_nodelist) -> LaunchInfo:
    """Read the launcher's variables from `env` (pure apart from `first_host`).

    torchrun wins when RANK and WORLD_SIZE are set. SLURM counts only inside an srun step
    (SLURM_STEP_ID set): an sbatch script itself also carries SLURM_PROCID=0 and SLURM_NTASKS=N
    but is one process, and treating it as rank 0 of N would wait forever for the others.
    MASTER_ADDR / MASTER_PORT in the environment override the SLURM-derived ones.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing:
            raise ConfigError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} "
                              "is not; launch with torchrun or set both")
        return _checked(LaunchInfo(
            "torchrun", _env_int(env, "RANK"),
            _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            _env_int(env, "WORLD_SIZE"), env["MASTER_ADDR"], _env_int(env, "MASTER_PORT")), "RANK")
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        if tasks_var not in env:
            raise ConfigError("srun step without SLURM_STEP_NUM_TASKS or SLURM_NTASKS")
        master_addr = env.get("MASTER_ADDR")
        if not master_addr:
            nodelist_var = next((name for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                                   "SLURM_NODELIST") if env.get(name)), None)
            if nodelist_var is None:
                raise ConfigError("srun step without a node list (SLURM_STEP_NODELIST, "
                                  "SLURM_JOB_NODELIST or SLURM_NODELIST) and without MASTER_ADDR")
            master_addr = first_host(env[nodelist_var])
        return _checked(LaunchInfo(
            "slurm", _env_int(env, "SLURM_PROCID"),
            _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            _env_int(env, tasks_var), master_addr,
            _env_int(env, "MASTER_PORT") if env.get("MASTER_PORT") else DEFAULT_MASTER_PORT),
            "SLURM_PROCID")
    return LaunchInfo("single", 0, 0, 1, None, None)


def local_world_size(env: Mapping[str, str]) -> int:
    """Processes on this node: torchrun's LOCAL_WORLD_SIZE, else SLURM's tasks per node
    (SLURM_STEP_TASKS_PER_NODE reads like '8(x2)'), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "")
        match = re.match(r"\d+", value)
        if match:
            return max(1, int(match.group()))
    return 1


def default_workers(workers: int, local_processes: int,
                    env: Mapping[str, str] = os.environ) -> tuple[int, str | None]:
    """Data-loader workers of one process (train.py and test.py alike), and the notice line when the
    configured number was lowered. TRAIN.workers counts per node, as in semseg, and is split across
    the node's processes; -1 picks min(4, cores per process). Cores are those this process may run
    on (util.threads.usable_cores); more workers than that are capped, unless the user forces them."""
    cores = max(1, usable_cores() // local_processes)
    if workers < 0:
        return min(4, cores), None
    setting = f"TRAIN.workers {workers}" + (f" (per node, {local_processes} processes)" if local_processes > 1 else "")
    return capped_workers((workers + local_processes - 1) // local_processes, cores, env, setting)


def _resolve_backend(cfg_backend: str) -> str:
    if cfg_backend not in BACKENDS:
        raise ConfigError(f"dist_backend: expected one of {', '.join(BACKENDS)}, got {cfg_backend!r}")
    if cfg_backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if cfg_backend == "nccl" and not torch.cuda.is_available():
        # semseg configs say nccl; running them on a CPU machine must need no edit.
        logger.warning("Distributed.dist_backend is nccl but there is no GPU; using gloo")
        return "gloo"
    return cfg_backend


def visible_devices(train_gpu: list[int], current: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a launch on TRAIN.train_gpu. The indices count within what is
    visible already (a scheduler's `2,3`, UUIDs or MIG names), as CUDA numbers them; an empty
    setting (GPUs deliberately hidden) stays empty."""
    if current is None:
        return ",".join(str(g) for g in train_gpu)
    if not current.strip():
        return current
    visible = [entry.strip() for entry in current.split(",")]
    outside = [g for g in train_gpu if not 0 <= g < len(visible)]
    if outside:
        raise ConfigError(f"TRAIN.train_gpu {train_gpu}: {outside} not among the {len(visible)} GPU(s) of "
                          f"CUDA_VISIBLE_DEVICES={current} (numbered 0..{len(visible) - 1})")
    return ",".join(visible[g] for g in train_gpu)


def _select_device(local_rank: int, launcher: str) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 1 and launcher == "slurm":  # srun --gpus-per-task: each task sees only its own GPU
        local_rank = 0
    if local_rank >= count:
        raise ConfigError(f"local rank {local_rank} has no GPU: this node shows {count}; "
                          "start at most one process per visible GPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(cfg_backend: str = "auto", dist_timeout_s: float = DEFAULT_TIMEOUT_S,
                     env: Mapping[str, str] | None = None) -> DistInfo:
    """Join the job's process group (if launched as several processes) and pick the device.

    cfg_backend: auto (nccl with CUDA, else gloo) | nccl | gloo. A collective that waits longer
    than dist_timeout_s for a peer fails instead of hanging, so a dead process ends the job.
    With one process no group is created. On CUDA the current device becomes cuda:local_rank.
    """
    launch = detect_launch(os.environ if env is None else env, _scontrol_first_host)
    backend = _resolve_backend(cfg_backend)
    if dist_timeout_s <= 0:
        raise ConfigError(f"dist_timeout: expected a positive number of seconds, got {dist_timeout_s}")
    device = _select_device(launch.local_rank, launch.launcher)
    if launch.world_size > 1:
        timeout = timedelta(seconds=dist_timeout_s)
        device_id = device if backend == "nccl" else None  # NCCL: barriers know the GPU
        if launch.launcher == "torchrun":
            dist.init_process_group(backend, store=attempt_store(os.environ if env is None else env, timeout),
                                    rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                                    device_id=device_id)
        else:
            dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                    rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                                    device_id=device_id)
    return DistInfo(launch.rank, launch.local_rank, launch.world_size, device, launch.rank == 0)


def attempt_store(env: Mapping[str, str], timeout: timedelta) -> dist.Store:
    """The key-value store of this torchrun attempt: torchrun's agent serves one store at
    MASTER_ADDR:PORT for the whole job, and a group restarted by --max-restarts writes the same
    keys as the group that died, whose addresses are still there. A new rank that read a dead
    rank's address before its peer replaced it failed in gloo's connectFullMesh with "Connection
    refused". Keys under a prefix per restart (RESTART_VARIABLE) are never stale."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    return dist.PrefixStore(f"semseg/attempt{env.get(RESTART_VARIABLE, '0')}", store)


def is_distributed() -> bool:
    """True when a process group is up (even one of size 1)."""
    return dist.is_available() and dist.is_initialized()


def cleanup_distributed() -> None:
    """Leave the process group if there is one."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's `obj` on every process (picklable objects only)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_to_main(items: list) -> list:
    """Every process's `items` (picklable) concatenated in rank order on rank 0; [] elsewhere.
    Without a process group: `items` itself."""
    if not is_distributed():
        return items
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, gathered, dst=0)
    return [item for part in gathered for item in part] if gathered is not None else []


def _check_rank(process_rank: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_rank < process_count:
        raise ValueError(f"rank {process_rank} is not in [0, world_size {process_count})")


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Strided evaluation shard: indices i in [0, n) with i % world_size == rank.

    Shards are disjoint and together cover range(n) once, with no padding duplicates, so summed
    metrics are exact; sizes differ by at most one. Striding spreads a sorted list evenly.
    """
    _check_rank(rank, world_size)
    if n < 0:
        raise ValueError(f"cannot shard a negative number of items ({n})")
    return list(range(rank, n, world_size))


class GlobalBatchSampler(Sampler):
    """Batch sampler whose optimisation is the same for any process count and accumulation.

    Epoch e draws one permutation of range(dataset_size) from a torch.Generator seeded with
    (seed * 1_000_003 + e) mod 2**63 (identity order when shuffle=False). Global batch b is
    perm[b*B:(b+1)*B] with B = global_batch_size. It is cut into world_size * micro_batches_per_step
    consecutive chunks of size B / (world_size * micro_batches_per_step); process r yields chunks
    r*A .. r*A + A - 1 (A = micro_batches_per_step) in order, i.e. its contiguous slice
    [r*B/W, (r+1)*B/W) split into A micro-batches. Hence the micro-batches of all processes for
    one optimiser step, concatenated in rank order, are exactly global batch b, whatever W and A.

    Elements are (epoch, index) tuples so the dataset can seed augmentation per sample and epoch.
    Use as DataLoader(dataset, batch_sampler=sampler) and call set_epoch(e) before each epoch;
    set_epoch(e, first_step=s) skips the first s global batches, where a mid-epoch checkpoint left
    off (s counts global batches, so it holds for any process count).
    With drop_last=False the last, short global batch is cut the same way into near-equal
    chunks (torch.tensor_split sizes); it must have at least W * A samples so no process gets
    an empty micro-batch.
    """

    def __init__(self, dataset_size: int, global_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, micro_batches_per_step: int = 1) -> None:
        _check_rank(rank, world_size)
        if global_batch_size < 1 or micro_batches_per_step < 1 or seed < 0:
            raise ValueError(f"need global batch size >= 1, micro_batches_per_step >= 1 and "
                             f"seed >= 0, got {global_batch_size}, {micro_batches_per_step}, {seed}")
        chunks = world_size * micro_batches_per_step
        if global_batch_size % chunks:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by world_size "
                f"{world_size} x micro_batches_per_step {micro_batches_per_step} = {chunks}")
        remainder = dataset_size % global_batch_size
        if drop_last and dataset_size < global_batch_size:
            raise ValueError(f"dataset of {dataset_size} samples holds no full global batch "
                             f"of {global_batch_size}")
        if not drop_last and 0 < remainder < chunks:
            raise ValueError(
                f"the last global batch would hold {remainder} samples, fewer than world_size x "
                f"micro_batches_per_step = {chunks}; use drop_last or another batch size")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.micro_batches_per_step = micro_batches_per_step
        self.epoch = 0
        self.first_step = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps (global batches) per epoch."""
        full, remainder = divmod(self.dataset_size, self.global_batch_size)
        return full + (1 if remainder and not self.drop_last else 0)

    @property
    def micro_batch_size(self) -> int:
        """Samples per yielded micro-batch (the last step may differ when drop_last=False)."""
        return self.global_batch_size // (self.world_size * self.micro_batches_per_step)

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        if epoch < 0 or not 0 <= first_step <= self.steps_per_epoch:
            raise ValueError(f"need epoch >= 0 and 0 <= first_step <= {self.steps_per_epoch}, got {epoch}, {first_step}")
        self.epoch = epoch
        self.first_step = first_step

    def epoch_order(self) -> torch.Tensor:
        """The permutation of the current epoch (identical on every process)."""
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed((self.seed * EPOCH_SEED_STRIDE + self.epoch) % 2**63)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.epoch_order()
        chunks = self.world_size * self.micro_batches_per_step
        first = self.rank * self.micro_batches_per_step
        for step in range(self.first_step, self.steps_per_epoch):
            global_batch = order[step * self.global_batch_size:(step + 1) * self.global_batch_size]
            for chunk in torch.tensor_split(global_batch, chunks)[first:first + self.micro_batches_per_step]:
                yield [(self.epoch, int(index)) for index in chunk]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.first_step) * self.micro_batches_per_step
