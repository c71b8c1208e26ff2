"""Generate the synthetic toy dataset (semseg layout: images/, labels/, list files, names, colours).

    python tool/make_toy_dataset.py                 # dataset/toy, seed 0, 240 train / 60 val
    python tool/make_toy_dataset.py --dst /tmp/toy --seed 3 --train 20 --val 5 -f

Running it again with the same settings finds the finished dataset and does nothing.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.cli import run_main  # noqa: E402
from util.toy_data import CLASS_NAMES, SIZE_RANGE, generate_toy_dataset  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dst", default="dataset/toy", help="output folder (default dataset/toy)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    parser.add_argument("--train", type=int, default=240, help="training images (default 240)")
    parser.add_argument("--val", type=int, default=60, help="validation images (default 60)")
    parser.add_argument("--min-size", type=int, default=SIZE_RANGE[0],
                        help=f"smallest image side in pixels (default {SIZE_RANGE[0]})")
    parser.add_argument("--max-size", type=int, default=SIZE_RANGE[1],
                        help=f"largest image side in pixels (default {SIZE_RANGE[1]})")
    parser.add_argument("-f", "--force", action="store_true",
                        help="regenerate even if dst holds a toy dataset made with other settings")
    args = parser.parse_args(argv)
    if args.train < 1 or args.val < 1:
        parser.error("--train and --val must be at least 1")
    if not 16 <= args.min_size <= args.max_size:
        parser.error("expected 16 <= --min-size <= --max-size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    written = generate_toy_dataset(args.dst, args.seed, args.train, args.val,
                                   (args.min_size, args.max_size), force=args.force)
    if not written:
        print(f"{args.dst}: toy dataset already complete (seed {args.seed}, {args.train} train, "
              f"{args.val} val); nothing to do (-f regenerates it)")
        return 0
    print(f"{args.dst}: wrote {args.train} train and {args.val} val samples, "
          f"{len(CLASS_NAMES)} classes ({', '.join(CLASS_NAMES)}), seed {args.seed}, "
          f"in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    run_main(main)
