"""Train PSPNet / PSANet: one process per device, from one CPU to many GPU nodes.

  python tool/train.py --config=config/toy/toy_pspnet18.yaml [SECTION.key value ...]
  torchrun --nproc_per_node=4 tool/train.py --config=config/ade20k/ade20k_pspnet50.yaml
  srun --ntasks-per-node=8 python tool/train.py --config=...           (one task per GPU)

CUDA is used when available, else the CPU, with no config edit. A plain `python tool/train.py` on
a multi-GPU node spawns one process per GPU in TRAIN.train_gpu, as semseg did.
TRAIN.batch_size is the global batch: split across processes and TRAIN.accum_steps micro-batches.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import sys
import time
from pathlib import Path
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
from model.weights import (imagenet_weights_path, load_backbone_weights, load_checkpoint, load_model_state,  # noqa: E402
                           load_model_weights)
from util.checkpoint import (BEST_FILE, archive_previous_run, atomic_save, check_writable,  # noqa: E402
                             checkpoints_to_come, epoch_checkpoints, prune_checkpoints, remove_stale_temporaries,
                             resolve_resume, rng_state, set_rng_state, training_checkpoint_kind, with_module_prefix)
from util.cli import Progress, run_main, setup_logging  # noqa: E402
from util.config import (NO_FILE, Config, add_config_arguments, describe_schema, load_config,  # noqa: E402
                         parse_config_args)
from util.dataset import dataset_from_config  # noqa: E402
from util.distributed import (DistInfo, GlobalBatchSampler, broadcast_object, cleanup_distributed,  # noqa: E402
                              default_workers, detect_launch, init_distributed, local_world_size, shard_indices,
                              visible_devices)
from util.errors import ConfigError, UserError  # noqa: E402
from util.experiment import RESUME_COMMAND_VARIABLE, resume_command  # noqa: E402
from util.loss import count_valid, label_at_output_size, segmentation_loss  # noqa: E402
from util.memory import children_peak_mib  # noqa: E402
from util.metrics import ConfusionMatrix, format_scores_table  # noqa: E402
from util.optim import build_optimizer, optimizer_state_from_semseg, set_poly_lr  # noqa: E402
from util.palette import read_names  # noqa: E402
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
                        prefetch_factor=4 if workers > 0 else None, worker_init_fn=init_data_worker,
                        generator=torch.Generator().manual_seed(seed))  # keeps the global RNG untouched
    return loader, sampler


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
    fetch = (f"python tool/prepare_weights.py --layers {cfg.layers} fetches it" if not cfg.pretrained_backbone
             else f"python tool/prepare_weights.py --layers {cfg.layers} --output {path} writes it")
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


def save_checkpoint(cfg: Config, epoch: int, iteration: int, net, optimizer, scaler, best_miou: float,
                    is_best: bool, epoch_file: bool) -> list[Path]:
    """best.pth when this epoch is the best so far (whatever save_freq says), the epoch file when due."""
    state = {"epoch": epoch, "iteration": iteration, "state_dict": with_module_prefix(net.state_dict()),
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "best_miou": best_miou,
             "rng": rng_state(), "config": cfg.to_dict()}
    written = []
    if is_best:  # before the epoch file: a crash in between then redoes this epoch and rewrites best.pth
        written.append(Path(cfg.save_path) / BEST_FILE)
        atomic_save(state, written[-1])
    if epoch_file:
        written.append(Path(cfg.save_path) / f"train_epoch_{epoch}.pth")
        atomic_save(state, written[-1])
        prune_checkpoints(cfg.save_path, cfg.keep_checkpoints)
    return written


def train_worker(cfg: Config, imagenet: Path | None) -> None:
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
                       need_bytes=2 * param_bytes * checkpoints_to_come(save_path, cfg.keep_checkpoints))

    start_epoch, best_miou = cfg.start_epoch, -1.0
    resume_path = resolve_resume(cfg.resume, save_path)
    if resume_path is not None:
        start_epoch, best_miou = resume_training(resume_path, cfg, net, optimizer, scaler)
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
    max_iter = cfg.epochs * steps
    logger.info("global batch %d = %d process(es) x %d accumulation step(s) x %d; %d steps/epoch, %d epochs; "
                "%d data workers and %d CPU threads per process", cfg.batch_size, info.world_size, cfg.accum_steps,
                sampler.micro_batch_size, steps, cfg.epochs, workers, threads)
    writer = SummaryWriter(str(save_path)) if info.is_main else None

    progress = Progress(max_iter, start=start_epoch * steps)
    scores = None
    with say_how_to_continue(cfg, info):  # once epochs run, an interrupt or a failure names the way on
        for epoch in range(start_epoch, cfg.epochs):
            sampler.set_epoch(epoch)
            model.train()
            epoch_start = time.perf_counter()
            wait, train_scores = train_one_epoch(cfg, info, model, train_loader, optimizer, scaler, epoch, steps,
                                                 max_iter, progress, writer)
            log_epoch_speed(epoch, steps * cfg.batch_size, time.perf_counter() - epoch_start, wait, info.device)
            log_scores("training", "train", train_scores, epoch, cfg, writer)
            is_best = False
            if val_loader is not None:
                scores = validate(net, val_loader, cfg, info)  # unwrapped: shards may differ in length
                is_best = scores.miou > best_miou
                best_miou = max(best_miou, scores.miou)
                log_scores("validation", "val", scores, epoch, cfg, writer)
            epoch_file = (epoch + 1) % cfg.save_freq == 0 or epoch + 1 == cfg.epochs
            if info.is_main and (epoch_file or is_best):
                for path in save_checkpoint(cfg, epoch + 1, (epoch + 1) * steps, net, optimizer, scaler, best_miou,
                                            is_best, epoch_file):
                    logger.info("saved %s", path)
            if info.distributed:
                dist.barrier()  # no process starts the next epoch before the checkpoint is complete
    if scores is not None:
        names = read_names(cfg.names_path, cfg.classes) if cfg.names_path else None
        logger.info("final validation:\n%s", format_scores_table(scores, names))
    if writer is not None:
        writer.close()
    logger.info("training done: %s", save_path)
    cleanup_distributed()


def resume_training(path: Path, cfg: Config, net, optimizer, scaler) -> tuple[int, float]:
    """Load a checkpoint of tool/train.py, or semseg's {'epoch', 'state_dict', 'optimizer'}, into the
    model, optimizer and scaler; returns (epochs done, best mIoU so far)."""
    ckpt = load_checkpoint(path, "TRAIN.resume", cfg.trust_pickle)
    kind = training_checkpoint_kind(ckpt, path)
    load_model_state(net, ckpt, path, "TRAIN.resume")
    if kind == "semseg":
        optimizer.load_state_dict(optimizer_state_from_semseg(ckpt["optimizer"], net, path))
        logger.info("resumed from %s, a semseg training checkpoint (epoch %d done): model, momentum and epoch "
                    "carried over; the RNG, grad scaler and best mIoU, which semseg did not save, start fresh",
                    path, ckpt["epoch"])
        return ckpt["epoch"], -1.0
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler.is_enabled() and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    elif scaler.is_enabled():
        logger.info("%s was saved without fp16 AMP: the grad scaler starts fresh", path)
    set_rng_state(ckpt["rng"])
    logger.info("resumed from %s (epoch %d done)", path, ckpt["epoch"])
    return ckpt["epoch"], ckpt["best_miou"]


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


def train_one_epoch(cfg, info, model, loader, optimizer, scaler, epoch, steps, max_iter, progress, writer):
    """One pass over the global batches; host-device syncs only at print_freq (fp16's grad scaler
    also checks for inf gradients every step). Returns (seconds spent waiting for data, the scores
    of the training predictions over the epoch, as semseg reports them)."""
    device = info.device
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # main loss, aux loss, correct px, valid px
    matrix = ConfusionMatrix(cfg.classes, cfg.ignore_label, device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    data_time = batch_time = total_wait = 0.0
    logged_steps = 0
    batches = iter(loader)
    end = time.perf_counter()
    for step in range(steps):
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
                loss, main_loss, aux_loss = segmentation_loss(main, aux, label, cfg.aux_weight, cfg.ignore_label,
                                                              normaliser)
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
        end = time.perf_counter()
    matrix.reduce()
    return total_wait, matrix.compute()


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


@contextlib.contextmanager
def say_how_to_continue(cfg: Config, info: DistInfo):
    """When the epochs inside are interrupted, or fail after a checkpoint exists, name the newest
    checkpoint and the command that continues from it: in the `interrupted` line, or in the log
    before the error line. Rank 0 only."""
    try:
        yield
    except KeyboardInterrupt:
        hint = continue_hint(cfg) if info.is_main else None
        if hint is None:
            raise
        raise KeyboardInterrupt(hint) from None
    except Exception:
        hint = continue_hint(cfg) if info.is_main else None
        if hint is not None:
            logger.warning("the run stopped; %s", hint)
        raise


def continue_hint(cfg: Config) -> str | None:
    """The newest checkpoint and the command that continues from it; None before the first one."""
    try:
        saved = epoch_checkpoints(cfg.save_path)
    except OSError:  # say nothing rather than hide the error being reported
        return None
    if not saved:
        return None
    epoch, path = saved[-1]
    command = resume_command(sys.argv, os.environ, detect_launch(os.environ).launcher)
    return f"{path} holds epoch {epoch} of {cfg.epochs}; to continue from it, run: {command}"


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
            sys.exit(f"training stopped: {str(e).splitlines()[0]}")
        return
    train_worker(cfg, imagenet)


if __name__ == "__main__":
    run_main(main)
