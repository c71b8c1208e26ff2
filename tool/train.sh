#!/bin/sh
# semseg-style experiment: train, then evaluate, in exp/<dataset>/<exp_name>/.
#   sh tool/train.sh ade20k pspnet50          (config/ade20k/ade20k_pspnet50.yaml)
#   NPROC=4 sh tool/train.sh voc2012 psanet101 TRAIN.batch_size 8
# NPROC processes, one per GPU (default: the visible GPUs, 1 on a CPU machine); more than one go
# through torchrun. Extra arguments are config overrides for train.py and test.py; EXP_ROOT
# (default exp) moves the experiment folder.
# Running the same command again continues from the newest checkpoint (TRAIN.resume auto), and
# only evaluates again when training is complete; `TRAIN.resume ''` starts over, moving the
# earlier run's checkpoints, logs and events to model/previous-<time>/.
# Outputs: model/ (checkpoints, train-*.log, TensorBoard events), the evaluation in
# result/epoch_<n>/<split>/<ss|ms>/ (n: the checkpoint evaluated, the last epoch), and the whole
# terminal output, launcher messages and tracebacks included, in train-<time>.out and test-<time>.out.
set -e
cd "$(dirname "$0")/.."
. tool/experiment.sh
NPROC=${NPROC:-$($PYTHON -c "import torch; print(max(1, torch.cuda.device_count()))")}
cp tool/train.sh tool/train.py tool/test.py "$config" "$exp_dir"   # what produced this experiment

one_process=""
[ "$NPROC" -gt 1 ] || one_process="Distributed.multiprocessing_distributed False"  # no spawn either
SEMSEG_RESUME_COMMAND=$($PYTHON -m util.experiment rerun "$0" "$dataset" "$exp_name" "$@")
export SEMSEG_RESUME_COMMAND   # what train.py prints when interrupted or stopped after a checkpoint
logged "$exp_dir/train-$now.out" $(launch_command "$NPROC") tool/train.py --config="$config" $one_process \
  TRAIN.save_path "$exp_dir/model" TRAIN.resume auto "$@"
evaluate "$exp_dir/test-$now.out" "$PYTHON" "$@"
