#!/bin/sh
# semseg-style experiment: train, then evaluate, in exp/<dataset>/<exp_name>/.
#   sh tool/train.sh ade20k pspnet50          (config/ade20k/ade20k_pspnet50.yaml)
#   NPROC=4 sh tool/train.sh voc2012 psanet101 TRAIN.batch_size 8
# One process per GPU through torchrun (NPROC defaults to the visible GPUs, 1 on a CPU machine).
# Extra arguments are config overrides for train.py and test.py; EXP_ROOT (default exp) moves the
# experiment folder. Logs: model/train-*.log and the evaluation's save_folder/test-*.log (written by
# the scripts), plus the whole terminal output, launcher messages and tracebacks included, in
# <exp folder>/train-<time>.out and test-<time>.out.
set -e
cd "$(dirname "$0")/.."
. tool/experiment.sh
NPROC=${NPROC:-$($PYTHON -c "import torch; print(max(1, torch.cuda.device_count()))")}
cp tool/train.sh tool/train.py tool/test.py "$config" "$exp_dir"   # what produced this experiment

last_checkpoint() {  # save_path/train_epoch_<epochs>.pth of the config with these overrides
  $PYTHON -c 'import sys; sys.path.insert(0, "."); from util.config import load_config
c = load_config(sys.argv[1], sys.argv[2:]); print(f"{c.save_path}/train_epoch_{c.epochs}.pth")' "$@"
}

logged "$exp_dir/train-$now.out" $PYTHON -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  tool/train.py --config="$config" TRAIN.save_path "$exp_dir/model" "$@"
logged "$exp_dir/test-$now.out" $PYTHON tool/test.py --config="$config" \
  TEST.model_path "$(last_checkpoint "$config" TRAIN.save_path "$exp_dir/model" "$@")" "$@"
