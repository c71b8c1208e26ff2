"""Benchmark the pure-PyTorch PSA mask: against the loop definition, and its share of a PSANet-50 forward.

Prints two markdown tables:
1. psa_mask vs psa_mask_reference (the slow loop definition) on a small map, both mask types;
2. a PSANet-50 eval forward at --size (psa_type 2, default mask) and the time spent in its psa_mask
   calls, measured by re-running psa_mask on the attention tensors captured during that forward.

Example: python tool/bench_psa.py --size 233 --device cpu
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Callable, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lib.psa import psa_mask, psa_mask_reference  # noqa: E402
from model.psanet import PSANet, default_psa_mask_size  # noqa: E402


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=int, default=233, help="crop side for the PSANet-50 forward; (size-1) %% 8 == 0")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the PSANet-50 forward")
    parser.add_argument("--loop-side", type=int, default=10,
                        help="feature side for the loop comparison (mask 2*side-1, loop cost grows as side^4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is reported)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.size < 9 or (args.size - 1) % 8:
        parser.error(f"--size must satisfy (size - 1) % 8 == 0 and be at least 9, got {args.size}")
    if args.loop_side < 2:
        parser.error("--loop-side must be at least 2")
    return args


def best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time in seconds over repeats, after one warm-up run."""
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed()
    return min(timed() for _ in range(repeats))


def loop_comparison(side: int, device: torch.device, repeats: int) -> List[str]:
    mask = 2 * side - 1
    x = torch.randn(1, mask * mask, side, side, device=device)
    rows = ["| type | map | mask | psa_mask (ms) | loop reference (ms) | speed-up |", "|---|---|---|---|---|---|"]
    for psa_type in ("collect", "distribute"):
        fast = best_time(lambda: psa_mask(x, psa_type, mask, mask), device, repeats)
        slow = best_time(lambda: psa_mask_reference(x, psa_type, mask, mask), device, 1)
        rows.append(f"| {psa_type} | {side}x{side} | {mask}x{mask} | {fast * 1e3:.3f} | {slow * 1e3:.1f} "
                    f"| {slow / fast:.0f}x |")
    return rows


def forward_share(size: int, batch: int, device: torch.device, repeats: int) -> List[str]:
    mask = default_psa_mask_size(size, compact=False, shrink_factor=2)
    model = PSANet(layers=50, classes=21, psa_type=2, mask_h=mask, mask_w=mask).to(device).eval()
    captured = {}
    for name in ("attention", "attention_p"):
        getattr(model.psa, name).register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(name, output))
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        forward = best_time(lambda: model(x), device, repeats)
        masks = best_time(lambda: (psa_mask(captured["attention"], "collect", mask, mask),
                                   psa_mask(captured["attention_p"], "distribute", mask, mask)), device, repeats)
    side = captured["attention"].shape[-1]
    return ["| input | attention map | mask | forward (ms) | psa_mask x2 (ms) | share |", "|---|---|---|---|---|---|",
            f"| {batch}x3x{size}x{size} | {side}x{side} | {mask}x{mask} | {forward * 1e3:.1f} | {masks * 1e3:.2f} "
            f"| {100 * masks / forward:.2f}% |"]


def main(argv: List[str]) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("\n".join(loop_comparison(args.loop_side, device, args.repeats)))
    print()
    print("\n".join(forward_share(args.size, args.batch, device, args.repeats)))


if __name__ == "__main__":
    main(sys.argv[1:])
