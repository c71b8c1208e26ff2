#!/bin/bash
# GPU checks behind the GPU rows of docs/benchmarks.md, in one run (a few minutes on one GPU):
#   1. the CUDA tests (psa_mask, SyncBatchNorm, AMP training, batched inference, test.py on CUDA);
#   2. PSPNet-50 for a few iterations through torchrun, one process per GPU, with sync_bn and bf16
#      AMP + channels_last (SyncBatchNorm only synchronises with 2 or more GPUs);
#   3. tool/benchmark.py at PSPNet-50 sizes (crop 473, batch 8; 150 classes on a 512x683 image).
#   bash tool/gpu_check.sh [output folder, default exp/gpu_check]
set -uo pipefail
rc=0  # every step runs; the script fails if any step did
cd "$(dirname "$0")/.."
out=${1:-exp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible')" || exit 1
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
nvidia-smi -L 2>&1 | tee "$out/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"
python tool/make_toy_dataset.py
. tool/logged.sh

logged "$out/gpu_tests.log" python -m pytest -q -m gpu tests/test_gpu.py || rc=1
[ "$gpus" -ge 2 ] || echo "one GPU: the torchrun step runs one process, so SyncBatchNorm has nothing to synchronise"
head -$((16 * gpus)) dataset/toy/train.txt > "$out/train_subset.txt"  # 4 iterations of 4 images per GPU
logged "$out/pspnet50_torchrun.log" python -m torch.distributed.run --standalone --nproc_per_node="$gpus" tool/train.py \
  --config=config/toy/toy_pspnet18.yaml TRAIN.layers 50 TRAIN.train_h 473 TRAIN.train_w 473 \
  TRAIN.batch_size $((4 * gpus)) TRAIN.epochs 1 TRAIN.sync_bn True TRAIN.amp bf16 TRAIN.channels_last True \
  TRAIN.print_freq 1 DATA.train_list "$out/train_subset.txt" TRAIN.save_path "$out/pspnet50" || rc=1
# 20 steps per timed epoch, so that the first batch's wait on fresh workers does not dominate the data-wait share
logged "$out/benchmark.log" python tool/benchmark.py --train-layers 50 --train-crop 473 --train-batch 8 --train-samples 160 \
  --eval-layers 50 --eval-classes 150 --eval-size 512x683 --eval-crop 473 --psa-size 465 \
  --json "$out/benchmark.json" || rc=1
exit $rc
