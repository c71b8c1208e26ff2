"""End-to-end training on the tiny toy data: outputs, process-count independence, resume, schedule."""
import os
import re
import struct
import sys

import pytest
import torch

from conftest import REPO_ROOT, run_tool, write_config
from model import build_model
from util.config import load_config
from util.optim import build_optimizer, poly_lr, set_poly_lr


def final_weights(model_dir, epoch):
    ckpt = torch.load(model_dir / f"train_epoch_{epoch}.pth", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def assert_same_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=f"{k} differs")
        else:
            assert torch.equal(a[k], b[k]), k


def event_scalars(model_dir) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the TensorBoard event files (TFRecord: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2
    scalars = {}
    for path in sorted(model_dir.glob("events.out.tfevents*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length = struct.unpack("<Q", data[pos:pos + 8])[0]
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_short_run_writes_checkpoint_events_log_and_config(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "run" / "cfg.yaml", tiny_toy, TRAIN={"evaluate": True, "epochs": 1})
    out = run_tool("train.py", f"--config={cfg}")
    assert out.returncode == 0, out.stderr[-3000:]
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "train_epoch_1.pth").is_file() and (model_dir / "best.pth").is_file()
    scalars = event_scalars(model_dir)
    assert {"loss_train_batch", "allAcc_train_batch", "lr", "mIoU_train", "mAcc_train", "allAcc_train",
            "mIoU_val", "mAcc_val", "allAcc_val"} <= scalars.keys()
    logs = list(model_dir.glob("train-*.log"))
    for what, tag in (("training", "train"), ("validation", "val")):
        logged = re.search(rf"epoch 1/1 {what} mIoU ([0-9.]+) mAcc ([0-9.]+) allAcc ([0-9.]+)", logs[0].read_text())
        assert logged, what
        for name, text in zip(("mIoU", "mAcc", "allAcc"), logged.groups()):
            (step, value), = scalars[f"{name}_{tag}"]
            assert step == 1 and abs(value - float(text)) < 6e-5, (name, tag, value, text)
    validation_line, = [line for line in logs[0].read_text().splitlines() if "validation mIoU" in line]
    assert "(centre crop of train_h x train_w, one scale, no flip" in validation_line
    assert "differs from tool/test.py's sliding-window, multi-scale, flipped score" in validation_line
    assert load_config(model_dir / "config.yaml").epochs == 1
    ckpt = torch.load(model_dir / "train_epoch_1.pth", map_location="cpu", weights_only=True)
    assert {"epoch", "state_dict", "optimizer", "scaler", "best_miou", "rng"} <= ckpt.keys()
    assert all(k.startswith("module.") for k in ckpt["state_dict"])  # semseg's layout
    assert "global batch 4 = 1 process(es) x 1 accumulation step(s) x 4" in out.stdout


def test_lr_follows_poly_at_every_step_in_a_run(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "run" / "cfg.yaml", tiny_toy, TRAIN={"epochs": 2, "base_lr": 0.02})
    out = run_tool("train.py", f"--config={cfg}")
    assert out.returncode == 0, out.stderr[-3000:]
    logged = [float(x) for x in re.findall(r" lr ([0-9.]+) ", out.stdout)]
    max_iter = 2 * 4  # 16 samples / batch 4, two epochs
    assert len(logged) == max_iter
    for step, lr in enumerate(logged, start=1):
        assert lr == pytest.approx(poly_lr(0.02, step, max_iter, 0.9), abs=1e-6)


def test_poly_schedule_sets_both_groups():
    cfg = load_config(write_config(REPO_ROOT / "exp" / "_t" / "c.yaml", REPO_ROOT / "dataset" / "toy"))
    model = build_model(cfg)
    opt = build_optimizer(model, 0.01, 0.9, 1e-4)
    names = {g["name"] for g in opt.param_groups}
    assert names == {"backbone", "head"}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for it in range(1, 11):
        set_poly_lr(opt, 0.01, it, 10, 0.9)
        expected = 0.01 * (1 - it / 10) ** 0.9
        lrs = {g["name"]: g["lr"] for g in opt.param_groups}
        assert lrs["backbone"] == pytest.approx(expected) and lrs["head"] == pytest.approx(10 * expected)
    backbone_ids = {id(p) for p in model.layer0.parameters()} | {id(p) for p in model.layer4.parameters()}
    group = {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert backbone_ids <= group["backbone"] and not (backbone_ids & group["head"])


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tiny_toy, tmp_path):
    """Same global batch, SyncBatchNorm on: the weights agree to float tolerance.

    A small learning rate keeps this tiny net from amplifying round-off (changing only the
    thread count already moves weights by ~1e-5 here); without SyncBatchNorm they differ far more.
    """
    (tmp_path / "train8.txt").write_text("".join((tiny_toy / "train.txt").read_text().splitlines(True)[:8]))
    train = {"base_lr": 0.0005, "train_h": 49, "train_w": 49, "print_freq": 2}
    data = {"train_list": str(tmp_path / "train8.txt")}
    runs = {"one": ([], None), "two": ([], TORCHRUN_2), "two_nosync": (["TRAIN.sync_bn", "False"], TORCHRUN_2)}
    weights = {}
    for name, (extra, launcher) in runs.items():
        cfg = write_config(tmp_path / name / "cfg.yaml", tiny_toy, DATA=data, TRAIN=train)
        out = run_tool("train.py", f"--config={cfg}", *extra, launcher=launcher)
        assert out.returncode == 0, out.stderr[-3000:]
        weights[name] = final_weights(tmp_path / name / "model", 2)
    assert "2 process(es) x 1 accumulation step(s) x 2" in out.stdout
    assert_same_weights(weights["one"], weights["two"], atol=3e-4)
    with pytest.raises(AssertionError):
        assert_same_weights(weights["one"], weights["two_nosync"], atol=3e-4)


def test_accumulation_equals_two_processes_without_sync_batchnorm(tiny_toy, tmp_path):
    """2 micro-batches of 2 in one process compute what 2 processes of 2 compute without SyncBN:
    BatchNorm over 2 samples, gradients summed over the global batch. Only the BN running statistics
    differ (DDP keeps rank 0's), so the parameters are compared; batch-4 BatchNorm differs."""
    (tmp_path / "train8.txt").write_text("".join((tiny_toy / "train.txt").read_text().splitlines(True)[:8]))
    train = {"base_lr": 0.0005, "train_h": 49, "train_w": 49, "print_freq": 2, "sync_bn": False}
    data = {"train_list": str(tmp_path / "train8.txt")}
    runs = {"accumulated": (["TRAIN.accum_steps", "2"], None), "two_processes": ([], TORCHRUN_2),
            "one_batch_of_4": ([], None)}
    params = {}
    for name, (extra, launcher) in runs.items():
        cfg = write_config(tmp_path / name / "cfg.yaml", tiny_toy, DATA=data, TRAIN=train)
        out = run_tool("train.py", f"--config={cfg}", *extra, launcher=launcher)
        assert out.returncode == 0, out.stderr[-3000:]
        weights = final_weights(tmp_path / name / "model", 2)
        params[name] = {k: v for k, v in weights.items() if not k.endswith(("running_mean", "running_var",
                                                                            "num_batches_tracked"))}
    assert_same_weights(params["accumulated"], params["two_processes"], atol=0)  # bit-identical here
    with pytest.raises(AssertionError):
        assert_same_weights(params["accumulated"], params["one_batch_of_4"], atol=3e-4)


def test_accumulation_reaches_the_configured_global_batch(tiny_toy, tmp_path):
    """2 micro-batches of 2 per step: same number of optimizer steps and schedule as batch 4."""
    cfg = write_config(tmp_path / "b" / "cfg.yaml", tiny_toy, TRAIN={"epochs": 1, "accum_steps": 2})
    out = run_tool("train.py", f"--config={cfg}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "global batch 4 = 1 process(es) x 2 accumulation step(s) x 2; 4 steps/epoch" in out.stdout
    assert len(re.findall(r" lr ([0-9.]+) ", out.stdout)) == 4


def test_resume_gives_the_uninterrupted_weights(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "run" / "cfg.yaml", tiny_toy, TRAIN={"dropout": 0.1, "print_freq": 4})
    out = run_tool("train.py", f"--config={cfg}")
    assert out.returncode == 0, out.stderr[-3000:]
    model_dir = tmp_path / "run" / "model"
    straight = final_weights(model_dir, 2)
    (model_dir / "train_epoch_2.pth").unlink()  # as if the run had stopped after epoch 1
    out = run_tool("train.py", f"--config={cfg}", "TRAIN.resume", "auto")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and "train_epoch_1.pth" in out.stdout
    assert_same_weights(straight, final_weights(model_dir, 2), atol=0)


def test_config_typo_is_one_line(tiny_toy, tmp_path):
    cfg = write_config(tmp_path / "run" / "cfg.yaml", tiny_toy)
    out = run_tool("train.py", f"--config={cfg}", "TRAIN.base_lrr", "0.1")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "base_lrr" in lines[0] and "did you mean base_lr" in lines[0]


def test_loader_and_sync_optimisations_do_not_change_results(tiny_toy, tmp_path):
    """Workers with persistent prefetching and rare host syncs (print_freq) give the very same weights
    as the plain loop. channels_last changes convolution round-off only: compared after one step,
    before this tiny net's training amplifies round-off (see the two-process test)."""
    (tmp_path / "train4.txt").write_text("".join((tiny_toy / "train.txt").read_text().splitlines(True)[:4]))
    one_step = {"train_list": str(tmp_path / "train4.txt")}
    runs = {"plain": ({}, {"workers": 0, "print_freq": 1}),
            "fast": ({}, {"workers": 2, "print_freq": 100}),
            "plain_1step": (one_step, {"workers": 0}),
            "channels_last_1step": (one_step, {"workers": 2, "channels_last": True})}
    weights = {}
    for name, (data, train) in runs.items():
        cfg = write_config(tmp_path / name / "cfg.yaml", tiny_toy, DATA=data,
                           TRAIN={"epochs": 1, "base_lr": 0.0005, "train_h": 49, "train_w": 49, **train})
        out = run_tool("train.py", f"--config={cfg}")
        assert out.returncode == 0, out.stderr[-3000:]
        weights[name] = final_weights(tmp_path / name / "model", 1)
    assert_same_weights(weights["plain"], weights["fast"], atol=0)
    assert_same_weights(weights["plain_1step"], weights["channels_last_1step"], atol=1e-5)


def test_fresh_run_moves_an_earlier_runs_checkpoints_aside(tiny_toy, tmp_path):
    """A new run must not prune its own checkpoint in favour of an older run's higher epochs, nor
    leave those for `resume auto`: they go to save_path/previous-<time>/, nothing is deleted. The
    earlier run's log and TensorBoard events go with them, so TensorBoard shows the runs apart."""
    (tmp_path / "train4.txt").write_text("".join((tiny_toy / "train.txt").read_text().splitlines(True)[:4]))
    cfg = write_config(tmp_path / "run" / "cfg.yaml", tiny_toy, DATA={"train_list": str(tmp_path / "train4.txt")},
                       TRAIN={"epochs": 3, "keep_checkpoints": 1})
    assert run_tool("train.py", f"--config={cfg}").returncode == 0
    assert [p.name for p in (tmp_path / "run" / "model").glob("train_epoch_*.pth")] == ["train_epoch_3.pth"]
    out = run_tool("train.py", f"--config={cfg}", "TRAIN.epochs", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    model_dir = tmp_path / "run" / "model"
    assert [p.name for p in model_dir.glob("train_epoch_*.pth")] == ["train_epoch_1.pth"]
    archived = list(model_dir.glob("previous-*/train_epoch_3.pth"))
    assert len(archived) == 1 and "with its logs and TensorBoard events, to" in out.stdout + out.stderr
    earlier = archived[0].parent
    assert len(list(earlier.glob("train-*.log"))) == 1 and "epoch 3/3" in next(earlier.glob("train-*.log")).read_text()
    assert max(step for step, _ in event_scalars(earlier)["lr"]) == 3  # 1 step per epoch, 3 epochs
    log, = model_dir.glob("train-*.log")  # this run's, still being written
    assert "epoch 1/1" in log.read_text() and "epoch 3/3" not in log.read_text()
    assert [step for step, _ in event_scalars(model_dir)["lr"]] == [1]


def test_resume_may_switch_to_fp16_amp(tiny_toy, tmp_path):
    """A checkpoint saved without fp16 has no grad-scaler state; resuming with fp16 starts a fresh scaler.
    One step per epoch: fp16 is emulated, and slow, on CPUs without native fp16."""
    (tmp_path / "train4.txt").write_text("".join((tiny_toy / "train.txt").read_text().splitlines(True)[:4]))
    cfg = write_config(tmp_path / "run" / "cfg.yaml", tiny_toy, DATA={"train_list": str(tmp_path / "train4.txt")},
                       TRAIN={"print_freq": 4})
    out = run_tool("train.py", f"--config={cfg}", "TRAIN.epochs", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_tool("train.py", f"--config={cfg}", "TRAIN.resume", "auto", "TRAIN.amp", "fp16")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "was saved without fp16 AMP: the grad scaler starts fresh" in out.stdout
    assert torch.load(tmp_path / "run" / "model" / "train_epoch_2.pth", weights_only=True)["scaler"]


def _validation_counts(rank: int, world: int, port: int, cfg_path: str, out_dir: str) -> None:
    """One process of a validation run inside training: same initial weights everywhere."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU arithmetic on a GPU machine too
    torch.set_num_threads(1)
    from tool.train import make_val_loader, validate
    from util.distributed import cleanup_distributed, init_distributed
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} if world > 1 else {}
    os.environ.update(env)  # env:// reads the rendezvous address from the environment
    cfg = load_config(cfg_path)
    info = init_distributed("gloo", 60, env=env)
    torch.manual_seed(0)
    scores = validate(build_model(cfg), make_val_loader(cfg, info, workers=0), cfg, info)
    cleanup_distributed()
    torch.save({"intersection": scores.intersection, "union": scores.union, "target": scores.target,
                "miou": scores.miou}, f"{out_dir}/rank{rank}_of_{world}.pt")


def test_validation_during_training_merges_uneven_shards_exactly(tiny_toy, tmp_path):
    """7 val images over 2 processes (4 + 3), one image per forward: the merged per-class areas equal
    the single process's exactly, so mIoU does too."""
    import socket
    import torch.multiprocessing as mp
    (tmp_path / "val7.txt").write_text("".join((tiny_toy / "val.txt").read_text().splitlines(True)[:7]))
    cfg = write_config(tmp_path / "cfg.yaml", tiny_toy, DATA={"val_list": str(tmp_path / "val7.txt")},
                       TRAIN={"batch_size_val": 1})
    _validation_counts(0, 1, 0, str(cfg), str(tmp_path))
    cfg2 = write_config(tmp_path / "two" / "cfg.yaml", tiny_toy, DATA={"val_list": str(tmp_path / "val7.txt")},
                        TRAIN={"batch_size_val": 2})  # 1 per process
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_validation_counts, args=(2, port, str(cfg2), str(tmp_path)), nprocs=2, join=True)
    one = torch.load(tmp_path / "rank0_of_1.pt", weights_only=False)
    assert one["target"].sum() > 0 and one["intersection"].sum() > 0
    for rank in range(2):
        two = torch.load(tmp_path / f"rank{rank}_of_2.pt", weights_only=False)
        for key in ("intersection", "union", "target"):
            assert (two[key] == one[key]).all(), (key, two[key], one[key])
        assert two["miou"] == one["miou"]
