"""Train PSPNet / PSANet: one process per device, from one CPU to many GPU nodes.

  python tool/train.py --config=config/toy/toy_pspnet18.yaml [SECTION.key value ...]
  torchrun --nproc_per_node=4 tool/train.py --config=config/ade20k/ade20k_pspnet50.yaml
  srun --ntasks-per-node=8 python tool/train.py --config=...           (one task per GPU)

CUDA is used when available, else the CPU, with no config edit. A plain `python tool/train.py` on
a multi-GPU node spawns one process per GPU in TRAIN.train_gpu, as semseg did.
TRAIN.batch_size is the global batch: split across processes and TRAIN.accum_steps micro-batches.

SIGTERM or SIGUSR1 (SLURM's time limit or preemption, torchrun passing either on) to any process:
every process finishes its iteration, rank 0 saves that point (train_epoch_<e>_step_<s>.pth) and
all exit with status 75; Ctrl-C does the same with status 130 (util/preemption.py). The same
command with TRAIN.resume auto continues exactly where it stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.threads import init_data_worker, set_openmp_defaults, set_process_threads  # noqa: E402

set_openmp_defaults()  # before torch loads OpenMP, which reads its wait settings once
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tensorboardX import SummaryWriter  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lib.sync_bn import convert_sync_batchnorm  # noqa: E402
from model import build_model  # noqa: E402
from model.imagenet_convert import load_backbone_weights  # noqa: E402
from model.imagenet_sources import fetch_command, source_depths  # noqa: E402
from model.weights import imagenet_weights_path, load_checkpoint, load_model_state, load_model_weights  # noqa: E402
from util.checkpoint import (BEST_FILE, archive_checkpoints_after, archive_previous_run, atomic_save,  # noqa: E402
                             check_writable, checkpoints_to_come, epoch_checkpoints, mid_epoch_file, prune_checkpoints,
                             prune_mid_epoch, remove_stale_temporaries, resolve_resume, rng_state, set_rng_state,
                             training_checkpoint_kind, training_checkpoints, with_module_prefix)
from util.cli import Progress, run_main, setup_logging  # noqa: E402
from util.config import (NO_FILE, Config, add_config_arguments, describe_schema, load_config,  # noqa: E402
                         parse_config_args)
from util.dataset import dataset_from_config  # noqa: E402
from util.distributed import (RESTART_VARIABLE, DistInfo, GlobalBatchSampler, broadcast_object,  # noqa: E402
                              cleanup_distributed, default_workers, detect_launch, init_distributed, local_world_size,
                              shard_indices, visible_devices)
from util.errors import ConfigError, RunStopped, UserError  # noqa: E402
from util.experiment import RESUME_COMMAND_VARIABLE, resume_command  # noqa: E402
from util.loss import count_valid, label_at_output_size, segmentation_loss  # noqa: E402
from util.memory import children_peak_mib  # noqa: E402
from util.metrics import ConfusionMatrix, format_scores_table  # noqa: E402
from util.optim import build_optimizer, optimizer_state_from_semseg, set_poly_lr  # noqa: E402
from util.palette import read_names  # noqa: E402
from util.preemption import CheckpointTimer, StopRequest, exit_status, pause_for_test, signal_name  # noqa: E402
from util.precision import autocast  # noqa: E402
from util.transform import build_train_transform, build_val_transform  # noqa: E402

logger = logging.getLogger("train")
VALIDATION_NOTE = (" (centre crop of train_h x train_w, one scale, no flip: a quick check that differs from "
                   "tool/test.py's sliding-window, multi-scale, flipped score)")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog="config keys:\n" + describe_schema(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    return parse_config_args(parser, argv)


def make_train_loader(cfg: Config, info: DistInfo, seed: int, workers: int) -> tuple[DataLoader, GlobalBatchSampler]:
    if not cfg.train_list:
        raise ConfigError("DATA.train_list is not set: training needs a list file of `image label` lines")
    dataset = dataset_from_config(cfg, cfg.train_list, "train", build_train_transform(cfg), seed)
    try:
        sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, info.rank, info.world_size, seed,
                                     micro_batches_per_step=cfg.accum_steps)
    except ValueError as e:
        raise ConfigError(f"TRAIN.batch_size {cfg.batch_size} with {info.world_size} process(es) and "
                          f"TRAIN.accum_steps {cfg.accum_steps}, {len(dataset)} samples in "
                          f"{cfg.train_list}: {e}") from None
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                        pin_memory=info.device.type == "cuda", persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None, worker_init_fn=init_train_data_worker,
                        generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched
    return loader, sampler


def init_train_data_worker(worker_id: int) -> None:
    """A forked data worker inherits the stop handlers (util/preemption.py) of its training process.
    Ctrl-C and SIGUSR1 are left to that process, which ends its workers when it stops. SIGTERM still
    ends a worker (the DataLoader ends a stuck one with it), but with exit status 0: a SIGTERM sent to
    the whole job (scancel, SLURM preemption, docker stop) reaches the workers too, and a worker killed
    by a signal makes PyTorch raise in the training process, in the middle of the checkpoint that the
    same SIGTERM asked for."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    init_data_worker(worker_id)


def make_val_loader(cfg: Config, info: DistInfo, workers: int) -> DataLoader:
    if not cfg.val_list:
        raise ConfigError("TRAIN.evaluate is on but DATA.val_list is not set")
    dataset = dataset_from_config(cfg, cfg.val_list, "val", build_val_transform(cfg))
    shard = torch.utils.data.Subset(dataset, shard_indices(len(dataset), info.rank, info.world_size))
    return DataLoader(shard, batch_size=max(1, cfg.batch_size_val // info.world_size), shuffle=False,
                      num_workers=workers, pin_memory=info.device.type == "cuda", worker_init_fn=init_data_worker)


def imagenet_start(cfg: Config) -> Path | None:
    """The ImageNet weights a fresh run's backbone starts from, checked before any work, as semseg
    does: TRAIN.pretrained_backbone, by default initmodel/resnet<layers>_v2.pth, and a missing file
    stops the run. None when TRAIN.weight or a checkpoint to resume gives the weights, or for `none`."""
    if cfg.weight or resolve_resume(cfg.resume, cfg.save_path) is not None:
        return None
    path = imagenet_weights_path(cfg.pretrained_backbone, cfg.layers)
    if path is None or path.is_file():
        return path
    if cfg.pretrained_backbone:
        what = f"TRAIN.pretrained_backbone ({cfg.source('pretrained_backbone')}): ImageNet weights"
    else:
        what = (f"TRAIN.pretrained_backbone is not set, so the backbone starts from semseg's ImageNet weights, the "
                f"deep-stem ResNet-{cfg.layers} file that semseg's PSPNet/PSANet load by default:")
    command = fetch_command(cfg.layers)
    if command is None:
        fetch = (f"no public source has ImageNet weights for ResNet-{cfg.layers} (prepare_weights fetches "
                 f"ResNet-{', -'.join(map(str, source_depths()))}); train one of those depths with TRAIN.layers")
    elif cfg.pretrained_backbone:
        fetch = f"{command} --output {path} writes it"
    else:
        fetch = f"{command} fetches it"
    raise ConfigError(f"{what} {path} not found; {fetch}, or put the file there, set TRAIN.pretrained_backbone to "
                      f"its path, or set TRAIN.pretrained_backbone {NO_FILE} to train from random weights")


def prepare_model(cfg: Config, info: DistInfo, imagenet: Path | None) -> torch.nn.Module:
    model = build_model(cfg)
    if imagenet is not None:
        load_backbone_weights(model, imagenet, "TRAIN.pretrained_backbone", trust_pickle=cfg.trust_pickle)
    if cfg.weight:
        load_model_weights(model, cfg.weight, "TRAIN.weight", trust_pickle=cfg.trust_pickle)
    if cfg.sync_bn and info.distributed:
        model = convert_sync_batchnorm(model, info.device)
    model = model.to(info.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@torch.no_grad()
def validate(model: torch.nn.Module, loader: DataLoader, cfg: Config, info: DistInfo):
    """Centre-crop validation on this process's shard; confusion matrices merged across processes."""
    model.eval()
    matrix = ConfusionMatrix(cfg.classes, cfg.ignore_label, info.device)
    for image, label in loader:
        image = image.to(info.device, non_blocking=True)
        if cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        with autocast(cfg.amp, info.device):
            logits = model(image)
        label = label.to(info.device)
        if logits.shape[-2:] != label.shape[-2:]:  # zoom_factor < 8: scored at label size, as semseg does
            logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=True)
        matrix.update(logits.argmax(1), label)
    matrix.reduce()
    model.train()
    return matrix.compute()


def training_state(cfg: Config, epochs_done: int, step: int, steps: int, seed: int, net, optimizer, scaler,
                   best_miou: float) -> dict:
    """Everything a run needs to go on from `step` global steps into epoch epochs_done + 1 (semseg's
    'epoch', 'state_dict', 'optimizer' first; the sampler position is epochs_done and step, and `seed`
    the data order's seed, which a run without TRAIN.manual_seed draws at random)."""
    return {"epoch": epochs_done, "state_dict": with_module_prefix(net.state_dict()),
            "optimizer": optimizer.state_dict(), "iteration": epochs_done * steps + step, "epoch_step": step,
            "steps_per_epoch": steps, "seed": seed, "scaler": scaler.state_dict(), "best_miou": best_miou,
            "rng": rng_state(), "config": cfg.to_dict()}


def save_mid_epoch(cfg: Config, state: dict) -> Path:
    """The mid-epoch checkpoint of `state`; the older one is deleted once this one is complete."""
    path = mid_epoch_file(cfg.save_path, state["epoch"], state["epoch_step"])
    atomic_save(state, path)
    prune_mid_epoch(cfg.save_path, path)
    return path


def save_checkpoint(cfg: Config, state: dict, is_best: bool, epoch_file: bool) -> list[Path]:
    """best.pth when this epoch is the best so far (whatever save_freq says), the epoch file when due."""
    epoch = state["epoch"]
    written = []
    if is_best:  # before the epoch file: a crash in between then redoes this epoch and rewrites best.pth
        written.append(Path(cfg.save_path) / BEST_FILE)
        atomic_save(state, written[-1])
    if epoch_file:
        written.append(Path(cfg.save_path) / f"train_epoch_{epoch}.pth")
        atomic_save(state, written[-1])
        prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
    return written


def train_worker(cfg: Config, imagenet: Path | None, clock: Callable[[], float] = time.monotonic) -> None:
    """One process of the run. `clock` times the mid-epoch checkpoints (TRAIN.checkpoint_minutes); a test
    passes one it sets."""
    info = init_distributed(cfg.dist_backend, cfg.dist_timeout)
    save_path = Path(cfg.save_path)
    if info.is_main:
        check_writable(save_path, "TRAIN.save_path")
    log_file = save_path / f"train-{time.strftime('%Y%m%d_%H%M%S')}.log"
    setup_logging(log_file if info.is_main else None, info.is_main)
    logger.info("training with %d process(es) on %s", info.world_size, info.device)
    if info.is_main:
        cfg.save(save_path / "config.yaml")
        logger.info("resolved config saved to %s", save_path / "config.yaml")
        for stale in remove_stale_temporaries(save_path):
            logger.info("removed %s, an unfinished checkpoint of an interrupted run", stale.name)

    stop = StopRequest().install(info.distributed)  # before any long work: no signal goes unhandled
    seed = cfg.manual_seed
    if seed is None:  # one random seed shared by all processes, logged so the run can be repeated
        seed = broadcast_object(int(torch.randint(0, 2**31 - 1, ()).item()))
        logger.info("TRAIN.manual_seed not set; using %d", seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest kernels
    threads = set_process_threads(local_world_size(os.environ))

    net = prepare_model(cfg, info, imagenet)
    optimizer = build_optimizer(net, cfg.base_lr, cfg.momentum, cfg.weight_decay)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.amp == "fp16")
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    if info.is_main:  # a checkpoint holds the model and its momentum
        check_writable(save_path, "TRAIN.save_path",
                       need_bytes=2 * param_bytes * checkpoints_to_come(save_path, cfg.keep_checkpoints,
                                                                         mid_epoch=cfg.checkpoint_minutes > 0))

    start_epoch, start_step, best_miou = cfg.start_epoch, 0, -1.0
    resume_path = resolve_resume(cfg.resume, save_path)
    resumed = None
    if resume_path is not None:
        resumed = resume_training(resume_path, cfg, net, optimizer, scaler)
        start_epoch, start_step, best_miou = resumed.epochs_done, resumed.step, resumed.best_miou
        if cfg.manual_seed is None and resumed.seed is not None:
            seed = resumed.seed  # the rest of the epoch in the order the run began it
            logger.info("TRAIN.manual_seed not set; the data order goes on with the run's seed %d", seed)
        if cfg.resume != "auto" and info.is_main:
            archive = archive_checkpoints_after(save_path, (start_epoch, start_step))
            if archive is not None:
                logger.warning("%s held checkpoints past the one resumed from; moved them to %s, so that "
                               "`TRAIN.resume auto` and pruning follow this run", save_path, archive)
    else:
        if imagenet is None and not cfg.weight:
            logger.warning("TRAIN.pretrained_backbone %s: the backbone starts from random weights, not from "
                           "ImageNet ones (semseg's published results start from initmodel/resnet<layers>_v2.pth)",
                           cfg.pretrained_backbone)
        if cfg.resume == "auto":
            logger.info("TRAIN.resume auto: no checkpoint in %s, starting from scratch", save_path)
        archive = archive_previous_run(save_path, log_file) if info.is_main else None
        if archive is not None:
            logger.warning("%s held checkpoints of an earlier run; moved them, with its logs and TensorBoard "
                           "events, to %s", save_path, archive)

    model = net
    if info.distributed:
        model = DistributedDataParallel(net, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                        find_unused_parameters=cfg.aux_weight == 0)
    if cfg.compile:
        model = torch.compile(model)

    workers, notice = default_workers(cfg.workers, local_world_size(os.environ))
    if notice and info.is_main:
        logger.warning(notice)
    train_loader, sampler = make_train_loader(cfg, info, seed, workers)
    val_loader = make_val_loader(cfg, info, workers) if cfg.evaluate else None
    steps = sampler.steps_per_epoch
    saved_steps = resumed.steps_per_epoch if resumed is not None else None
    if start_step and (start_step > steps or saved_steps not in (None, steps)):
        raise ConfigError(f"TRAIN.resume: {resume_path} stopped at step {start_step} of an epoch of "
                          f"{saved_steps or 'more'} steps, but this run has {steps} steps per epoch; resume with the "
                          f"batch size and list it was saved with")
    max_iter = cfg.epochs * steps
    # What a resumed run's first step uses (a changed base_lr or epochs included), as set after each step.
    set_poly_lr(optimizer, cfg.base_lr, start_epoch * steps + start_step, max_iter, cfg.power)
    logger.info("global batch %d = %d process(es) x %d accumulation step(s) x %d; %d steps/epoch, %d epochs; "
                "%d data workers and %d CPU threads per process", cfg.batch_size, info.world_size, cfg.accum_steps,
                sampler.micro_batch_size, steps, cfg.epochs, workers, threads)
    writer = SummaryWriter(str(save_path)) if info.is_main else None

    progress = Progress(max_iter, start=start_epoch * steps + start_step)
    timer = CheckpointTimer(cfg.checkpoint_minutes, clock)
    scores = None

    def save_position(epochs_done: int, step: int) -> None:
        """Rank 0 saves the point `step` global steps into epoch epochs_done + 1."""
        if info.is_main:
            state = training_state(cfg, epochs_done, step, steps, seed, net, optimizer, scaler, best_miou)
            logger.info("saved %s", save_mid_epoch(cfg, state))
        timer.restart()

    with say_how_to_continue(cfg, info):  # once epochs run, an interrupt or a failure names the way on
        for epoch in range(start_epoch, cfg.epochs):
            first_step = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch, first_step)
            model.train()
            epoch_start = time.perf_counter()
            wait, train_scores, stopped = train_one_epoch(cfg, info, model, train_loader, optimizer, scaler, epoch,
                                                          first_step, steps, max_iter, progress, writer,
                                                          stop, timer, save_position)
            if stopped is not None:
                stop_here(cfg, info, *stopped, epoch, steps)
            if first_step < steps:  # none ran when a stop came after the epoch's last step: validate and save
                log_epoch_speed(epoch, (steps - first_step) * cfg.batch_size, time.perf_counter() - epoch_start,
                                wait, info.device)
                log_scores("training", "train", train_scores, epoch, cfg, writer)
            is_best = False
            if val_loader is not None:
                scores = validate(net, val_loader, cfg, info)  # unwrapped: shards may differ in length
                is_best = scores.miou > best_miou
                best_miou = max(best_miou, scores.miou)
                log_scores("validation", "val", scores, epoch, cfg, writer)
            epoch_file = (epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.epochs
            if info.is_main and (epoch_file or is_best):
                state = training_state(cfg, epoch + 1, 0, steps, seed, net, optimizer, scaler, best_miou)
                for path in save_checkpoint(cfg, state, is_best, epoch_file):
                    logger.info("saved %s", path)
            timer.restart()
            if info.distributed:
                dist.barrier()  # no process starts the next epoch before the checkpoint is complete
        late, _ = stop.agreed()  # asked during the last validation, or an interrupt a finaliser swallowed
        if late:
            stop_here(cfg, info, late, steps, cfg.epochs - 1, steps)
    if scores is not None:
        names = read_names(cfg.names_path, cfg.classes) if cfg.names_path else None
        logger.info("final validation:\n%s", format_scores_table(scores, names))
    if writer is not None:
        writer.close()
    logger.info("training done: %s", save_path)
    cleanup_distributed()


class ResumePoint(NamedTuple):
    """Where a resumed run goes on from, and how its checkpoint's run cut its epochs."""
    epochs_done: int
    step: int  # global steps done of the next epoch
    best_miou: float
    seed: int | None  # the data order's seed; None in semseg's files and earlier versions of ours
    steps_per_epoch: int | None


def resume_training(path: Path, cfg: Config, net, optimizer, scaler) -> ResumePoint:
    """Load a checkpoint of tool/train.py (epoch end or mid-epoch), or semseg's {'epoch', 'state_dict',
    'optimizer'}, into the model, optimizer and scaler."""
    ckpt = load_checkpoint(path, "TRAIN.resume", cfg.trust_pickle)
    kind = training_checkpoint_kind(ckpt, path)
    load_model_state(net, ckpt, path, "TRAIN.resume")
    if kind == "semseg":
        optimizer.load_state_dict(optimizer_state_from_semseg(ckpt["optimizer"], net, path))
        logger.info("resumed from %s, a semseg training checkpoint (epoch %d done): model, momentum and epoch "
                    "carried over; the RNG, grad scaler and best mIoU, which semseg did not save, start fresh",
                    path, ckpt["epoch"])
        return ResumePoint(ckpt["epoch"], 0, -1.0, None, None)
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    elif scaler.is_enabled():
        logger.info("%s was saved without fp16 AMP: the grad scaler starts fresh", path)
    set_rng_state(ckpt["rng"])
    step = ckpt.get("epoch_step", 0)  # absent from epoch-end files of earlier versions
    where = f"epoch {ckpt['epoch'] + 1}, after step {step}" if step else f"epoch {ckpt['epoch']} done"
    logger.info("resumed from %s (%s)", path, where)
    return ResumePoint(ckpt["epoch"], step, ckpt["best_miou"], ckpt.get("seed"), ckpt.get("steps_per_epoch"))


def log_epoch_speed(epoch: int, images: int, seconds: float, data_wait: float, device: torch.device) -> None:
    """The numbers tool/benchmark.py reads: throughput, data-wait share, peak memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    workers = children_peak_mib()
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    logger.info("epoch %d speed: %.2f images/s, data wait %.1f%% of iteration time, peak host RSS %.0f MiB "
                "(data workers: %d, each at most %.0f MiB), CUDA max allocated %.0f MiB", epoch + 1,
                images / seconds, 100 * data_wait / seconds, rss, len(workers), max(workers, default=0.0), cuda)


def log_scores(what: str, tag: str, scores, epoch: int, cfg: Config, writer) -> None:
    """The epoch's mIoU / mAcc / allAcc in the log and as TensorBoard scalars <name>_<tag>."""
    logger.info("epoch %d/%d %s mIoU %.4f mAcc %.4f allAcc %.4f%s", epoch + 1, cfg.epochs, what,
                scores.miou, scores.macc, scores.allacc, VALIDATION_NOTE if tag == "val" else "")
    if writer is not None:
        for name, value in (("mIoU", scores.miou), ("mAcc", scores.macc), ("allAcc", scores.allacc)):
            writer.add_scalar(f"{name}_{tag}", value, epoch + 1)


def train_one_epoch(cfg, info, model, loader, optimizer, scaler, epoch, first_step, steps, max_iter, progress, writer,
                    stop, timer, save_position):
    """One pass over the global batches from first_step; host-device syncs only at print_freq (fp16's
    grad scaler also checks for inf gradients every step). After every step the processes agree on
    whether to stop (util/preemption.py) and, when a stop or the mid-epoch checkpoint timer says so,
    save_position saves that point. Returns (seconds spent waiting for data, the scores of the
    training predictions over the epoch, as semseg reports them, and (the agreed stop signal, the
    step it stopped after) or None)."""
    device = info.device
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # main loss, aux loss, correct px, valid px
    matrix = ConfusionMatrix(cfg.classes, cfg.ignore_label, device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    data_time = batch_time = total_wait = 0.0
    logged_steps = 0
    batches = iter(loader)
    end = time.perf_counter()
    stop.deferring = True  # a Ctrl-C now waits for the end of its iteration, which is then saved
    try:
        for step in range(first_step, steps):
            micro = [next(batches) for _ in range(cfg.accum_steps)]
            waited = time.perf_counter() - end
            data_time += waited
            total_wait += waited
            images = [m[0].to(device, non_blocking=True) for m in micro]
            labels = [label_at_output_size(m[1].to(device, non_blocking=True), cfg.zoom_factor) for m in micro]
            if cfg.channels_last:
                images = [x.contiguous(memory_format=torch.channels_last) for x in images]
            valid = count_valid(labels, cfg.ignore_label).to(torch.float32)
            if info.distributed:
                dist.all_reduce(valid)
            normaliser = valid.clamp(min=1) / info.world_size  # DDP averages gradients over processes
            for k, (image, label) in enumerate(zip(images, labels)):
                sync = k == len(images) - 1 or not info.distributed
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast(cfg.amp, device):
                    main, aux = model(image, return_aux=True)
                    loss, main_loss, aux_loss = segmentation_loss(main, aux, label, cfg.aux_weight,
                                                                  cfg.ignore_label, normaliser)
                scaler.scale(loss).backward()
                with torch.no_grad():
                    mask = label != cfg.ignore_label
                    pred = main.argmax(1)
                    stats += torch.stack([main_loss.detach().double(), aux_loss.detach().double(),
                                          ((pred == label) & mask).sum().double(), mask.sum().double()])
                    matrix.update(pred, label)
                    bad = ~torch.isfinite(loss.detach())
                    first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            current_iter = epoch * steps + step + 1
            lr = set_poly_lr(optimizer, cfg.base_lr, current_iter, max_iter, cfg.power)
            batch_time += time.perf_counter() - end
            logged_steps += 1
            if (step + 1) % cfg.print_freq == 0 or step + 1 == steps:
                check_finite(first_bad, epoch, steps, info, cfg)
                if info.distributed:
                    dist.all_reduce(stats)
                loss_main, loss_aux, correct, total = stats.tolist()
                n = logged_steps * info.world_size  # each process's losses carry a factor world_size
                logger.info("epoch [%d/%d] step [%d/%d] main loss %.4f aux loss %.4f pixel acc %.4f lr %.6f "
                            "data %.3fs batch %.3fs (%s)", epoch + 1, cfg.epochs, step + 1, steps,
                            loss_main / n, loss_aux / n, correct / max(total, 1),
                            lr, data_time / logged_steps, batch_time / logged_steps, progress.line(current_iter))
                if writer is not None:
                    writer.add_scalar("loss_train_batch", loss_main / n, current_iter)  # semseg's per-iteration tags
                    writer.add_scalar("allAcc_train_batch", correct / max(total, 1), current_iter)
                    writer.add_scalar("lr", lr, current_iter)
                stats.zero_()
                data_time = batch_time = 0.0
                logged_steps = 0
            pause_for_test(current_iter, info.rank, lambda: stop.signum != 0)
            stopped_by, due = stop.agreed(timer.due() and step + 1 < steps)  # the epoch's end saves anyway
            if stopped_by or due:
                check_finite(first_bad, epoch, steps, info, cfg)  # never save a diverged state
                save_position(epoch, step + 1)
            if stopped_by:
                return total_wait, None, (stopped_by, step + 1)
            end = time.perf_counter()
    finally:
        stop.deferring = False
    matrix.reduce()
    return total_wait, matrix.compute(), None


def check_finite(first_bad: torch.Tensor, epoch: int, steps: int, info: DistInfo, cfg: Config) -> None:
    """Stop every process with the first iteration whose loss was not finite (on any process)."""
    flag = first_bad.clone()
    if info.distributed:
        flag = torch.where(flag < 0, torch.full_like(flag, steps + 1), flag)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        flag = torch.where(flag > steps, torch.full_like(flag, -1), flag)
    step = int(flag.item())
    if step >= 0:
        iteration = epoch * steps + step + 1
        saved = epoch_checkpoints(cfg.save_path)
        last = (f"the last good checkpoint {saved[-1][1]} is intact" if saved else
                f"no checkpoint had been saved in {cfg.save_path} yet")
        raise TrainingDiverged(
            f"loss became NaN/inf at iteration {iteration} (epoch {epoch + 1}, step {step + 1}); stopped without "
            f"saving; {last}. Lower TRAIN.base_lr ({cfg.base_lr}) or check the data, then resume with "
            f"TRAIN.resume auto")


def stop_here(cfg: Config, info: DistInfo, signum: int, step: int, epoch: int, steps: int) -> None:
    """End every process after an agreed stop, once rank 0 has saved: Ctrl-C as an interrupt (130),
    SIGTERM / SIGUSR1 as RunStopped (75); rank 0's message holds the command that continues."""
    if info.distributed:
        dist.barrier()  # the checkpoint is complete before any process exits
    where = (f"on {signal_name(signum)} in epoch {epoch + 1}/{cfg.epochs} after step {step}/{steps} "
             f"(iteration {epoch * steps + step})")
    hint = continue_hint(cfg) if info.is_main else None
    logger.warning("stopped %s%s", where, f"; {hint}" if hint else "")
    if signum == signal.SIGINT:
        raise KeyboardInterrupt(hint or "")
    raise RunStopped(f"{where}; {hint}" if hint else where, exit_status(signum))


@contextlib.contextmanager
def say_how_to_continue(cfg: Config, info: DistInfo):
    """When the epochs inside are interrupted, or fail after a checkpoint exists, name the newest
    checkpoint and the command that continues from it: in the `interrupted` line, or in the log
    before the error line. Rank 0 only."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        hint = continue_hint(cfg) if info.is_main and not str(interrupt) else None
        if hint is None:
            raise
        raise KeyboardInterrupt(hint) from None
    except RunStopped:  # says it already
        raise
    except Exception:
        hint = continue_hint(cfg) if info.is_main else None
        if hint is not None:
            logger.warning("the run stopped; %s", hint)
        raise


def continue_hint(cfg: Config) -> str | None:
    """The newest checkpoint and the command that continues from it; None before the first one."""
    try:
        saved = training_checkpoints(cfg.save_path)
    except OSError:  # say nothing rather than hide the error being reported
        return None
    if not saved:
        return None
    (epoch, step), path = saved[-1]
    where = f"epoch {epoch} of {cfg.epochs}" + (f" and step {step} of epoch {epoch + 1}" if step else "")
    command = resume_command(sys.argv, os.environ, detect_launch(os.environ).launcher)
    return f"{path} holds {where}; to continue from it, run: {command}"


def spawn_worker(local_rank: int, cfg: Config, gpus: int, imagenet: Path | None) -> None:
    """Child of a plain-python multi-GPU launch: joins the group through the env:// variables."""
    url = urlparse(cfg.dist_url)
    os.environ.update(RANK=str(cfg.rank * gpus + local_rank), LOCAL_RANK=str(local_rank),
                      WORLD_SIZE=str(cfg.world_size * gpus), LOCAL_WORLD_SIZE=str(gpus),
                      MASTER_ADDR=url.hostname or "127.0.0.1", MASTER_PORT=str(url.port or 29500))
    run_main(lambda: train_worker(cfg, imagenet))


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.opts)
    if not cfg.resume and int(os.environ.get(RESTART_VARIABLE, "0")) > 0:
        cfg.resume = "auto"  # a group that torchrun --max-restarts restarts goes on; starting over would archive it
    imagenet = imagenet_start(cfg)
    launched = detect_launch(os.environ).launcher != "single"
    if not launched and cfg.train_gpu:  # before any CUDA call, so that this launch sees only these GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(cfg.train_gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
    gpus = torch.cuda.device_count()
    if cfg.train_gpu and 0 < gpus < len(cfg.train_gpu):
        logger.warning("TRAIN.train_gpu lists %d GPUs but %d exist; using %d", len(cfg.train_gpu), gpus, gpus)
    if not launched and cfg.multiprocessing_distributed and gpus > 0 and (gpus > 1 or cfg.world_size > 1):
        # The children look launched (RANK, WORLD_SIZE); their resume hint must name this command.
        os.environ.setdefault(RESUME_COMMAND_VARIABLE, resume_command(sys.argv, os.environ, "single"))
        try:
            mp.spawn(spawn_worker, args=(cfg, gpus, imagenet), nprocs=gpus)
        except mp.ProcessException as e:  # the failing child has printed its own reason
            code = getattr(e, "exit_code", None)  # 75 after a stop, 130 after Ctrl-C, 2 for a user error
            sys.exit(code if code and code > 0 else f"training stopped: {str(e).splitlines()[0]}")
        return
    train_worker(cfg, imagenet)


if __name__ == "__main__":
    run_main(main)
