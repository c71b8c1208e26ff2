"""The cost of train.py's per-iteration stop agreement (util/preemption.py): images/s of DDP training
steps with and without StopRequest.agreed() after each step, in one run, blocks interleaved so
that both see the same machine.

  torchrun --standalone --nproc_per_node=2 tool/bench_stop_check.py            # CPU, gloo
  torchrun --standalone --nproc_per_node=2 tool/bench_stop_check.py --layers 50 --crop 473 --batch 8   # GPUs

A toy-sized PSPNet on random data (the data loader is not what is measured); rank 0 prints one
markdown row per setting with the median over the blocks.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from model.pspnet import PSPNet  # noqa: E402
from util.distributed import cleanup_distributed, init_distributed  # noqa: E402
from util.loss import segmentation_loss  # noqa: E402
from util.preemption import StopRequest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--crop", type=int, default=65, help="square crop side, 8k+1")
    parser.add_argument("--batch", type=int, default=2, help="images per process and step")
    parser.add_argument("--steps", type=int, default=10, help="steps per block")
    parser.add_argument("--blocks", type=int, default=6, help="blocks per setting, interleaved")
    args = parser.parse_args()
    info = init_distributed("auto")
    torch.manual_seed(0)
    net = PSPNet(layers=args.layers, classes=6).to(info.device)
    model = DistributedDataParallel(net) if info.distributed else net
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    stop = StopRequest().install(info.distributed)
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=info.device)
    labels = torch.randint(0, 6, (args.batch, args.crop, args.crop), device=info.device)

    def block(check: bool) -> float:
        """images/s over one block of steps, all processes counted."""
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            main, aux = model(images, return_aux=True)
            segmentation_loss(main, aux, labels, 0.4, 255, torch.tensor(labels.numel(), device=info.device))[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if check:
                stop.agreed()
        if info.device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * args.batch * info.world_size / (time.perf_counter() - start)

    block(True)  # warm-up
    speeds = {False: [], True: []}
    for _ in range(args.blocks):
        for check in (False, True):
            speeds[check].append(block(check))
    calls = 200
    start = time.perf_counter()
    for _ in range(calls):
        stop.agreed()
    per_call_ms = 1000 * (time.perf_counter() - start) / calls
    if info.is_main:
        print(f"{info.world_size} process(es) on {info.device}, ResNet-{args.layers} PSPNet, crop {args.crop}, "
              f"batch {args.batch} per process, {args.blocks} blocks of {args.steps} steps")
        print("| stop check | images/s (median) | blocks |\n|---|---|---|")
        for check in (False, True):
            print(f"| {'on' if check else 'off'} | {statistics.median(speeds[check]):.2f} | "
                  f"{', '.join(f'{s:.2f}' for s in speeds[check])} |")
        off, on = statistics.median(speeds[False]), statistics.median(speeds[True])
        step_ms = 1000 * args.batch * info.world_size / off
        print(f"cost of the check: {100 * (off - on) / off:+.2f}% of images/s (block to block noise included); "
              f"one agreement alone: {per_call_ms:.3f} ms, {100 * per_call_ms / step_ms:.3f}% of a {step_ms:.0f} ms step")
    cleanup_distributed()


if __name__ == "__main__":
    main()
