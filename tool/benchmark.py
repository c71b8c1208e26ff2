"""Benchmark training, evaluation and the PSA op; prints markdown tables and writes JSON.

  python tool/benchmark.py --quick                       # toy model; minutes on a CPU without native bf16
  python tool/benchmark.py --train-config=config/toy/toy_pspnet18.yaml
  python tool/benchmark.py --train-layers 50 --train-crop 473 --train-batch 8 --train-samples 80 \
      --eval-layers 50 --eval-classes 150 --eval-size 512x683 --eval-crop 473 --psa-size 465   # GPU rows
  python tool/benchmark.py --contention --baseline e6588b7   # shared machine, this tree against e6588b7

(a) training: tool/train.py itself runs 2 short epochs per mode on the config's data and the
    second epoch's "speed" line is read: images/s, data-wait share, peak host RSS, CUDA max
    allocated; modes fp32 / bf16 / fp16 AMP, channels_last off / on.
(b) evaluation: tool/test.py's batched sliding-window inference against the straightforward
    per-window reference (util/reference_inference.py) on the same model and image, and the pure
    network time (the same window batches through the model alone).
(c) PSA op: psa_mask against its loop definition, and its share of a PSANet forward.
(d) memory (--only memory): peak memory of one multi-scale evaluation of one image.
(e) ONNX (--only onnx): the network exported by tool/export.py's code, per-window time in
    onnxruntime (CPU) against PyTorch fp32 on the CPU, in test.py's CPU batches of 2 windows.
(g) int8 (--only int8): the networks of --int8-configs (random weights; by default PSPNet-50 and
    PSANet-50 for ADE20K: 150 classes, 473x473 windows) in PyTorch eager, onnxruntime float32 and
    onnxruntime int8 (tool/export.py --int8's quantization, calibrated on a few random windows: the
    ranges change the values, not the speed), timed interleaved in one run: one window (batch 1),
    and one --int8-size image through the sliding window at scale 1.0 with flip, as tool/test.py
    runs it. About 7 minutes per network on 2 quiet cores, most of it exporting and quantizing.
(f) contention (--contention, alone): toy training steps (tool/train.py's epoch-2 images/s) and
    tool/test.py on a few images (wall seconds), quiet and then beside one single-threaded busy
    process that the benchmark starts and stops; the slowdown ratios and the quiet throughput.
    --baseline REV runs REV's tools too (from `git archive`), interleaved, on the same data.
    About 6 minutes on 2 quiet cores with a baseline, 3 with --quick.
The device is CUDA when available, else the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from util.threads import set_openmp_defaults  # noqa: E402

USER_ENV = dict(os.environ)  # what the trees compared by --contention start from, untouched by this tree
set_openmp_defaults()  # before torch loads OpenMP, as the tools do
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lib.psa import psa_mask, psa_mask_reference  # noqa: E402
from model import build_model  # noqa: E402
from model.psanet import PSANet, default_psa_mask_size  # noqa: E402
from model.pspnet import PSPNet  # noqa: E402
from util.cli import run_main  # noqa: E402
from util.config import load_config  # noqa: E402
from util.errors import DataError  # noqa: E402
from util.inference import multi_scale_predict, resize_image, window_batch_size, window_grid  # noqa: E402
from util.onnx_model import OnnxNetwork, export_metadata, export_onnx, max_abs_difference  # noqa: E402
from util.quantize import quantize_int8  # noqa: E402
from util.reference_inference import reference_predict  # noqa: E402

SPEED_LINE = re.compile(r"epoch 2 speed: ([\d.]+) images/s, data wait ([\d.]+)% of iteration time, "
                        r"peak host RSS (\d+) MiB \(data workers: (\d+), each at most (\d+) MiB\), "
                        r"CUDA max allocated (\d+) MiB")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time in seconds over `repeats` runs after one warm-up."""
    def timed() -> float:
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start
    timed()
    return min(timed() for _ in range(repeats))


def train_modes(quick: bool) -> list[tuple[str, bool]]:
    if quick:
        return [("off", False), ("bf16", False)]
    return [(amp, cl) for amp in ("off", "bf16", "fp16") for cl in (False, True)]


def train_command(tree: Path, config: str, layers: int, crop: int, batch: int, train_list: str, save_path: str,
                  amp: str = "off", channels_last: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    """tool/train.py of `tree` for 2 short epochs, one process, printing its epoch-2 speed line."""
    return [sys.executable, str(tree / "tool" / "train.py"), f"--config={config}", "TRAIN.epochs", "2",
            "TRAIN.evaluate", "False", "TRAIN.save_path", save_path, "TRAIN.amp", amp,
            "TRAIN.channels_last", str(channels_last), "TRAIN.batch_size", str(batch), "TRAIN.train_h", str(crop),
            "TRAIN.train_w", str(crop), "TRAIN.print_freq", "1000", "TRAIN.manual_seed", "0",
            "TRAIN.layers", str(layers),
            "Distributed.multiprocessing_distributed", "False",  # one process: single-device rows
            "DATA.train_list", train_list, *extra]


def read_speed(out: subprocess.CompletedProcess) -> dict:
    """The fields of train.py's epoch-2 speed line, or {'error': the last line of stderr}."""
    found = SPEED_LINE.search(out.stdout)
    if found is None:
        return {"error": (out.stderr.strip().splitlines() or ["no speed line"])[-1][:200]}
    return {"images_per_s": float(found[1]), "data_wait_pct": float(found[2]), "peak_rss_mib": int(found[3]),
            "data_workers": int(found[4]), "worker_peak_rss_mib": int(found[5]), "cuda_max_alloc_mib": int(found[6])}


def bench_training(config: str, layers: int, crop: int, batch: int, samples: int, device: torch.device,
                   quick: bool, extra: list[str]) -> list[dict]:
    """Run tool/train.py for 2 epochs per mode and read its epoch-2 speed line."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train_list = subset_list(load_config(config).train_list, samples, Path(tmp) / "train_subset.txt")
        for amp, channels_last in train_modes(quick):
            cmd = train_command(REPO, config, layers, crop, batch, train_list, f"{tmp}/{amp}{int(channels_last)}",
                                amp, channels_last, tuple(extra))
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            row = {"amp": amp, "channels_last": channels_last, **read_speed(out)}
            rows.append(row)
            print(f"  train amp={amp} channels_last={channels_last}: {row}", flush=True)
    return rows


def subset_list(list_path: str, samples: int, path: Path) -> str:
    """The first `samples` lines of a list file (repeated when it is shorter), written to `path`."""
    if not Path(list_path).is_file():
        raise DataError(f"{list_path}: no such list file; the benchmark runs on the toy dataset: "
                        f"python tool/make_toy_dataset.py")
    lines = Path(list_path).read_text().splitlines()
    path.write_text("\n".join((lines * (samples // max(len(lines), 1) + 1))[:samples]) + "\n")
    return str(path)


@contextlib.contextmanager
def busy_neighbour(busy: bool):
    """One single-threaded process spinning on the CPU for the duration, when `busy`: the other job
    on a shared machine (yields its Popen, or None)."""
    if not busy:
        yield None
        return
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield neighbour
    finally:
        neighbour.kill()
        neighbour.wait()


def baseline_tree(ref: str, tmp: Path) -> Path:
    """The files of git revision `ref` of this repository, unpacked under tmp."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"error: --baseline {ref}: {archive.stderr.decode().strip()}")
    tree = tmp / "baseline"
    tree.mkdir()
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def median_of(runs: list[dict], tree: str, kind: str, busy: bool, field: str) -> float:
    return statistics.median(r[field] for r in runs if (r["tree"], r["kind"], r["busy"]) == (tree, kind, busy))


def bench_contention(config: str, samples: int, images: int, rounds: int, baseline: str | None) -> dict:
    """Toy training steps (epoch-2 images/s of tool/train.py) and tool/test.py on `images` images
    (wall seconds, start-up included), quiet and beside one busy process; with `baseline`, the same
    runs of that git revision interleaved with this tree's, so both see the same machine."""
    cfg = load_config(config)
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trees = {"this tree": REPO, **({f"baseline {baseline}": baseline_tree(baseline, tmp)} if baseline else {})}
        train_list = subset_list(cfg.train_list, samples, tmp / "train_subset.txt")
        test_list = subset_list(cfg.test_list, images, tmp / "test_subset.txt")
        runs = []

        def run(name: str, kind: str, busy: bool, cmd: list[str]) -> subprocess.CompletedProcess:
            load = os.getloadavg()[0]
            with busy_neighbour(busy):
                start = time.perf_counter()
                out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=USER_ENV)
                seconds = time.perf_counter() - start
            if out.returncode != 0:
                sys.exit(f"error: {kind} of {name} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            runs.append({"tree": name, "kind": kind, "busy": busy, "seconds": seconds, "load_before": load})
            print(f"  {name}: {kind} {'busy' if busy else 'quiet'} {seconds:.1f} s (load average {load:.2f})",
                  flush=True)
            return out

        checkpoint = ""
        for _ in range(rounds):
            for busy in (False, True):  # the trees alternate, so a change in the machine's load hits both
                for name, tree in trees.items():
                    save_path = str(tmp / "train" / name.replace(" ", "_"))
                    out = run(name, "train", busy, train_command(tree, config, cfg.layers, cfg.train_h,
                                                                 cfg.batch_size, train_list, save_path))
                    speed = read_speed(out)
                    if "error" in speed:
                        sys.exit(f"error: training of {name}: {speed['error']}")
                    runs[-1]["images_per_s"] = speed["images_per_s"]
                    checkpoint = checkpoint or str(Path(save_path) / "train_epoch_2.pth")
            for busy in (False, True):
                for name, tree in trees.items():
                    run(name, "test", busy, [sys.executable, str(tree / "tool" / "test.py"), f"--config={config}",
                                             "TEST.test_list", test_list, "TEST.model_path", checkpoint,
                                             "TEST.save_folder", str(tmp / "test" / name.replace(" ", "_"))])
        for name in trees:
            train_quiet, train_busy = (median_of(runs, name, "train", b, "images_per_s") for b in (False, True))
            test_quiet, test_busy = (median_of(runs, name, "test", b, "seconds") for b in (False, True))
            results[name] = {"train_quiet_images_per_s": train_quiet, "train_busy_images_per_s": train_busy,
                             "train_slowdown": train_quiet / train_busy, "test_quiet_s": test_quiet,
                             "test_busy_s": test_busy, "test_slowdown": test_busy / test_quiet}
    return {"images": images, "samples": samples, "rounds": rounds, "trees": results, "runs": runs}


class TimedModel(torch.nn.Module):
    """Counts the seconds spent inside the wrapped model (synchronising on CUDA)."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__()
        self.model, self.device, self.seconds = model, device, 0.0

    def forward(self, x):
        sync(self.device)
        start = time.perf_counter()
        out = self.model(x)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


def bench_evaluation(layers: int, classes: int, size: tuple[int, int], crop: int, device: torch.device,
                     repeats: int, amps: list[str]) -> list[dict]:
    """Seconds per image: batched (ours, per TEST.test_amp mode), the per-window float32 reference,
    and the network alone; one row per mode."""
    torch.manual_seed(0)
    model = PSPNet(layers=layers, classes=classes).to(device).eval()
    rng = np.random.default_rng(0)
    image = (rng.random((*size, 3)) * 255).astype(np.float32)
    base_size = max(size)
    scaled = [resize_image(image, base_size)]
    timed = TimedModel(model, device)

    def ours(net: torch.nn.Module, amp: str) -> float:
        start = time.perf_counter()
        multi_scale_predict(net, scaled, size, classes, crop, crop, 2 / 3, True, 0, device, amp=amp).argmax(0).cpu()
        return time.perf_counter() - start

    def reference():
        reference_predict(model, image, classes, crop, crop, base_size, [1.0], 2 / 3, True, torch.float32,
                          device).argmax(2)

    def timed_run(amp: str) -> tuple[float, float]:
        """(total, network) seconds of one image, the network timed inside the same run."""
        timed.seconds = 0.0
        return ours(timed, amp), timed.seconds

    windows = len(window_grid(max(size[0], crop), max(size[1], crop), crop, crop, 2 / 3))
    rows = []
    with torch.inference_mode():
        t_ref = best_time(reference, device, max(1, repeats // 2))
        for amp in amps:
            t_ours = best_time(lambda: ours(model, amp), device, repeats)
            total, network = min(timed_run(amp) for _ in range(repeats + 1))
            rows.append({"model": f"PSPNet-{layers}", "classes": classes, "image": f"{size[0]}x{size[1]}",
                         "crop": crop, "windows": windows, "amp": amp, "ours_s": t_ours, "reference_s": t_ref,
                         "speedup": t_ref / t_ours, "network_s": network,
                         "overhead_pct": 100 * max(0.0, total - network) / total})
    return rows


def bench_memory(layers: int, classes: int, size: tuple[int, int], crop: int, scales: list[float],
                 device: torch.device) -> dict:
    """Peak memory of one multi-scale evaluation of one image (host RSS growth, CUDA max allocated)."""
    torch.manual_seed(0)
    model = PSPNet(layers=layers, classes=classes).to(device).eval()
    image = (np.random.default_rng(0).random((*size, 3)) * 255).astype(np.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.inference_mode():
        scaled = [resize_image(image, round(s * max(size))) for s in scales]
        multi_scale_predict(model, scaled, size, classes, crop, crop, 2 / 3, True, 0, device).argmax(0).cpu()
    seconds = time.perf_counter() - start
    return {"model": f"PSPNet-{layers}", "classes": classes, "image": f"{size[0]}x{size[1]}", "crop": crop,
            "scales": scales, "seconds": seconds,
            "host_rss_growth_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before,
            "cuda_max_alloc_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0}


def bench_psa(size: int, loop_side: int, device: torch.device, repeats: int) -> dict:
    """psa_mask vs its loop definition on a small map, and its share of a PSANet-50 eval forward."""
    mask = 2 * loop_side - 1
    x = torch.randn(1, mask * mask, loop_side, loop_side, device=device)
    loop = {}
    for psa_type in ("collect", "distribute"):
        fast = best_time(lambda: psa_mask(x, psa_type, mask, mask), device, repeats)
        slow = best_time(lambda: psa_mask_reference(x, psa_type, mask, mask), device, 1)
        loop[psa_type] = {"psa_mask_ms": fast * 1e3, "loop_ms": slow * 1e3, "speedup": slow / fast}
    side_mask = default_psa_mask_size(size, compact=False, shrink_factor=2)
    model = PSANet(layers=50, classes=21, psa_type=2, mask_h=side_mask, mask_w=side_mask).to(device).eval()
    captured = {}
    for name in ("attention", "attention_p"):
        getattr(model.psa, name).register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(name, output))
    image = torch.randn(1, 3, size, size, device=device)
    with torch.inference_mode():
        forward = best_time(lambda: model(image), device, repeats)
        masks = best_time(lambda: (psa_mask(captured["attention"], "collect", side_mask, side_mask),
                                   psa_mask(captured["attention_p"], "distribute", side_mask, side_mask)),
                          device, repeats)
    return {"loop": loop, "psanet50_input": size, "mask": side_mask, "forward_ms": forward * 1e3,
            "psa_mask_ms": masks * 1e3, "share_pct": 100 * masks / forward}


def bench_onnx(layers: int, classes: int, crop: int, repeats: int) -> dict:
    """Seconds per window of a PSPNet in PyTorch fp32 and exported to onnxruntime, both on the CPU."""
    cfg = load_config(REPO / "config" / "toy" / "toy_pspnet18.yaml",
                      ["TRAIN.layers", str(layers), "DATA.classes", str(classes), "TEST.test_h", str(crop),
                       "TEST.test_w", str(crop)])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    windows = window_batch_size(0, "cpu")
    batch = torch.randn(windows, 3, crop, crop)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        export_onnx(model, path, batch, export_metadata(cfg, [str(i) for i in range(classes)], None, "benchmark"))
        export_s = time.perf_counter() - start
        network = OnnxNetwork(path, "benchmark")
        runs = {"pytorch": model, "onnxruntime": network}
        seconds = {name: [] for name in runs}
        with torch.inference_mode():
            for run in runs.values():  # warm-up
                run(batch)
            for _ in range(repeats):  # interleaved, so load from other users of a shared machine hits both alike
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(batch)
                    seconds[name].append(time.perf_counter() - start)
        difference = max_abs_difference(model, network, batch)
    pytorch_s, onnx_s = (min(seconds[name]) / windows for name in runs)
    return {"model": f"PSPNet-{layers}", "classes": classes, "crop": crop, "batch": windows, "export_s": export_s,
            "pytorch_s": pytorch_s, "onnxruntime_s": onnx_s, "speedup": pytorch_s / onnx_s,
            "max_abs_difference": difference}


class RandomWindows:
    """onnxruntime's CalibrationDataReader over `count` random normalised windows."""

    def __init__(self, count: int, crop: int, input_name: str):
        generator = torch.Generator().manual_seed(0)
        self.windows = count
        self.feed = iter([{input_name: torch.randn(1, 3, crop, crop, generator=generator).numpy()}
                          for _ in range(count)])

    def get_next(self) -> dict | None:
        return next(self.feed, None)


def bench_int8(config: str, size: tuple[int, int], repeats: int) -> dict:
    """Seconds per window (batch 1) and per image (sliding window, scale 1.0, flip) of the config's network
    in PyTorch eager, onnxruntime float32 and onnxruntime int8, interleaved on a shared machine."""
    cfg = load_config(config, ["TRAIN.pretrained_backbone", "none"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    crop_h, crop_w = cfg.test_h, cfg.test_w
    window = torch.randn(1, 3, crop_h, crop_w, generator=torch.Generator().manual_seed(1))
    image = np.random.default_rng(0).uniform(0, 255, (*size, 3)).astype(np.float32)
    name = f"{'PSPNet' if cfg.arch == 'psp' else 'PSANet'}-{cfg.layers}"
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        print(f"  {name}: exporting and quantizing ...", flush=True)
        start = time.perf_counter()
        export_onnx(model, fp32_path, window, export_metadata(cfg, [str(i) for i in range(cfg.classes)], None, "b"))
        fp32 = OnnxNetwork(fp32_path, "benchmark")
        quantization = quantize_int8(fp32_path, int8_path, RandomWindows(4, crop_h, fp32.input_name),
                                     {"calibration_list": "4 random windows"})
        prepare_s = time.perf_counter() - start
        runs = {"pytorch": model, "onnxruntime_fp32": fp32, "onnxruntime_int8": OnnxNetwork(int8_path, "benchmark")}
        seconds = {kind: {network: [] for network in runs} for kind in ("window", "image")}
        timed = {"window": lambda run: run(window),
                 "image": lambda run: multi_scale_predict(run, [image], size, cfg.classes, crop_h, crop_w,
                                                          cfg.stride_rate, batch_size=2)}
        with torch.inference_mode():
            for run in runs.values():  # warm-up
                run(window)
            for _ in range(repeats):  # interleaved, so load from other users of the machine hits all alike
                for kind, call in timed.items():
                    for network, run in runs.items():
                        start = time.perf_counter()
                        call(run)
                        seconds[kind][network].append(time.perf_counter() - start)
            agreement = (runs["onnxruntime_int8"](window).argmax(1) == model(window).argmax(1)).float().mean().item()
    windows = len(window_grid(*(max(s, c) for s, c in zip(size, (crop_h, crop_w))), crop_h, crop_w, cfg.stride_rate))
    best = {kind: {network: min(times) for network, times in by_network.items()}
            for kind, by_network in seconds.items()}
    return {"model": name, "classes": cfg.classes, "crop": crop_h, "image": f"{size[0]}x{size[1]}",
            "windows": windows, "prepare_s": prepare_s, "seconds": best, "random_window_agreement": agreement,
            "float_nodes": quantization["float_nodes"], "reduce_range": quantization["reduce_range"]}


def print_tables(result: dict) -> None:
    print(f"\ndevice: {result['device']}, torch {result['torch']}, threads {result['threads']}")
    if result.get("training"):
        print("\n| AMP | channels_last | images/s | data wait | peak RSS (MiB) | data workers x peak RSS (MiB) "
              "| CUDA max alloc (MiB) |")
        print("|---|---|---|---|---|---|---|")
        for r in result["training"]:
            if "error" in r:
                print(f"| {r['amp']} | {r['channels_last']} | error: {r['error']} | | | | |")
            else:
                print(f"| {r['amp']} | {r['channels_last']} | {r['images_per_s']:.2f} | {r['data_wait_pct']:.1f}% "
                      f"| {r['peak_rss_mib']} | {r['data_workers']} x {r['worker_peak_rss_mib']} "
                      f"| {r['cuda_max_alloc_mib']} |")
    if result.get("evaluation"):
        print("\n| model | image | windows | test_amp | ours (s/img) | reference, fp32 (s/img) | speed-up "
              "| network (s) | overhead |")
        print("|---|---|---|---|---|---|---|---|---|")
    for e in result.get("evaluation", []):
        print(f"| {e['model']} {e['classes']} cl. | {e['image']} crop {e['crop']} | {e['windows']} x2 flip "
              f"| {e['amp']} | {e['ours_s']:.3f} | {e['reference_s']:.3f} | {e['speedup']:.2f}x "
              f"| {e['network_s']:.3f} | {e['overhead_pct']:.1f}% |")
    if result.get("memory"):
        m = result["memory"]
        print(f"\nmemory: {m['model']} {m['classes']} classes, {m['image']} image, window {m['crop']}, scales "
              f"{m['scales']}: host RSS +{m['host_rss_growth_mib']:.0f} MiB, CUDA max allocated "
              f"{m['cuda_max_alloc_mib']:.0f} MiB, {m['seconds']:.1f} s")
    if result.get("psa"):
        p = result["psa"]
        print(f"\n| PSA op | collect | distribute |\n|---|---|---|\n| psa_mask (ms) | {p['loop']['collect']['psa_mask_ms']:.3f} "
              f"| {p['loop']['distribute']['psa_mask_ms']:.3f} |\n| loop reference (ms) | "
              f"{p['loop']['collect']['loop_ms']:.1f} | {p['loop']['distribute']['loop_ms']:.1f} |")
        print(f"\nPSANet-50 forward at {p['psanet50_input']}x{p['psanet50_input']} (mask {p['mask']}): "
              f"{p['forward_ms']:.1f} ms, psa_mask x2 {p['psa_mask_ms']:.2f} ms = {p['share_pct']:.2f}%")
    if result.get("contention"):
        print_contention(result["contention"])
    if result.get("int8"):
        print("\n| model | measured | PyTorch eager (s) | onnxruntime fp32 (s) | onnxruntime int8 (s) "
              "| int8 vs fp32 | int8 vs eager |\n|---|---|---|---|---|---|---|")
        for r in result["int8"]:
            for kind, what in (("window", f"one {r['crop']}x{r['crop']} window, batch 1"),
                               ("image", f"{r['image']} image, sliding window ({r['windows']} x2 flip)")):
                t = r["seconds"][kind]
                print(f"| {r['model']} {r['classes']} cl. | {what} | {t['pytorch']:.3f} | {t['onnxruntime_fp32']:.3f} "
                      f"| {t['onnxruntime_int8']:.3f} | **{t['onnxruntime_fp32'] / t['onnxruntime_int8']:.2f}x** "
                      f"| {t['pytorch'] / t['onnxruntime_int8']:.2f}x |")
    if result.get("onnx"):
        o = result["onnx"]
        print("\n| model | window | PyTorch fp32 (s/window) | onnxruntime (s/window) | speed-up | max abs diff |"
              f"\n|---|---|---|---|---|---|\n| {o['model']} {o['classes']} cl. | {o['crop']} (batches of {o['batch']}) "
              f"| {o['pytorch_s']:.3f} | {o['onnxruntime_s']:.3f} | {o['speedup']:.2f}x "
              f"| {o['max_abs_difference']:.1e} |")


def print_contention(c: dict) -> None:
    print(f"\nbeside one busy process ({c['samples']} training samples per epoch, test.py on {c['images']} images, "
          f"median of {c['rounds']} round(s)):\n\n| tree | training quiet (images/s) | training busy (images/s) "
          "| training slowdown | test.py quiet (s) | test.py busy (s) | test.py slowdown |\n"
          "|---|---|---|---|---|---|---|")
    for name, t in c["trees"].items():
        print(f"| {name} | {t['train_quiet_images_per_s']:.2f} | {t['train_busy_images_per_s']:.2f} "
              f"| {t['train_slowdown']:.2f}x | {t['test_quiet_s']:.1f} | {t['test_busy_s']:.1f} "
              f"| {t['test_slowdown']:.2f}x |")
    trees = list(c["trees"].values())
    if len(trees) == 2:
        ours, base = trees
        training = ours["train_quiet_images_per_s"] / base["train_quiet_images_per_s"]
        print(f"\nquiet, this tree against the baseline: training {training:.2f}x the images/s, "
              f"test.py {ours['test_quiet_s'] / base['test_quiet_s']:.2f}x the seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute on a CPU")
    parser.add_argument("--train-config", default="config/toy/toy_pspnet18.yaml", help="config for (a)")
    parser.add_argument("--train-layers", type=int, default=18, help="ResNet depth for (a)")
    parser.add_argument("--train-crop", type=int, default=97, help="training crop side for (a)")
    parser.add_argument("--train-batch", type=int, default=8, help="global batch for (a)")
    parser.add_argument("--train-samples", type=int, default=0, help="samples per epoch for (a); 0 = 4 batches")
    parser.add_argument("--train-extra", default="", help="more train.py overrides for (a), e.g. 'TRAIN.workers 0'")
    parser.add_argument("--eval-layers", type=int, default=18, help="PSPNet depth for (b)")
    parser.add_argument("--eval-classes", type=int, default=6, help="classes for (b)")
    parser.add_argument("--eval-size", default="160x200", help="image HxW for (b)")
    parser.add_argument("--eval-crop", type=int, default=97, help="window side for (b)")
    parser.add_argument("--eval-amp", default="off,bf16", help="TEST.test_amp modes timed for (b), comma list")
    parser.add_argument("--eval-scales", default="0.5,0.75,1.0,1.25,1.5,1.75", help="scales for the memory section")
    parser.add_argument("--psa-size", type=int, default=233, help="PSANet-50 input side for (c)")
    parser.add_argument("--only", default="train,eval,psa",
                        help="comma list of sections: train, eval, memory, psa, onnx, int8 "
                             "(memory and onnx use the --eval-* sizes)")
    parser.add_argument("--int8-configs",
                        default="config/ade20k/ade20k_pspnet50.yaml,config/ade20k/ade20k_psanet50.yaml",
                        help="configs whose networks (g) times, comma list")
    parser.add_argument("--int8-size", default="512x683", help="image HxW of (g)'s sliding-window rows")
    parser.add_argument("--contention", action="store_true",
                        help="only (f): toy training and test.py, quiet and beside one busy process")
    parser.add_argument("--contention-samples", type=int, default=32, help="training samples per epoch for (f)")
    parser.add_argument("--contention-images", type=int, default=12, help="test.py images for (f)")
    parser.add_argument("--contention-rounds", type=int, default=1, help="rounds of (f); medians are reported")
    parser.add_argument("--baseline", default="",
                        help="git revision whose tools (f) runs too, interleaved with this tree's, e.g. e6588b7")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    parser.add_argument("--json", default="exp/benchmark.json", help="where to write the JSON")
    if parser.parse_known_args()[0].quick:  # smaller defaults; options given explicitly still win
        parser.set_defaults(train_samples=16, psa_size=129, eval_size="120x150", repeats=1, contention_samples=16,
                            contention_images=4)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sections = {"contention"} if args.contention else set(args.only.split(","))
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{os.cpu_count()}",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    if "train" in sections:
        print("training ...", flush=True)
        result["training"] = bench_training(args.train_config, args.train_layers, args.train_crop, args.train_batch,
                                            args.train_samples or 4 * args.train_batch, device, args.quick,
                                            args.train_extra.split())
    if "eval" in sections:
        print("evaluation ...", flush=True)
        h, w = (int(v) for v in args.eval_size.split("x"))
        result["evaluation"] = bench_evaluation(args.eval_layers, args.eval_classes, (h, w), args.eval_crop,
                                                device, args.repeats, args.eval_amp.split(","))
    if "memory" in sections:
        print("evaluation memory ...", flush=True)
        h, w = (int(v) for v in args.eval_size.split("x"))
        result["memory"] = bench_memory(args.eval_layers, args.eval_classes, (h, w), args.eval_crop,
                                        [float(v) for v in args.eval_scales.split(",")], device)
    if "psa" in sections:
        print("PSA op ...", flush=True)
        result["psa"] = bench_psa(args.psa_size, 6 if args.quick else 10, device, args.repeats)
    if "contention" in sections:
        print("contention ...", flush=True)
        result["contention"] = bench_contention(args.train_config, args.contention_samples, args.contention_images,
                                                args.contention_rounds, args.baseline or None)
    if "onnx" in sections:
        print("ONNX export and onnxruntime ...", flush=True)
        result["onnx"] = bench_onnx(args.eval_layers, args.eval_classes, args.eval_crop, args.repeats)
    if "int8" in sections:
        print("int8: PyTorch eager, onnxruntime float32 and int8 ...", flush=True)
        h, w = (int(v) for v in args.int8_size.split("x"))
        result["int8"] = [bench_int8(config, (h, w), args.repeats) for config in args.int8_configs.split(",")]
    print_tables(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nJSON written to {args.json}")
    failed = [r for r in result.get("training", []) if "error" in r]
    if failed:  # a crashed mode must fail scripts such as tool/gpu_check.sh, not just print a row
        sys.exit("error: training failed for " + "; ".join(
            f"amp {r['amp']} channels_last {r['channels_last']} ({r['error']})" for r in failed))


if __name__ == "__main__":
    run_main(main)
