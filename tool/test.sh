#!/bin/sh
# Evaluate an experiment with its config's TEST settings (split, scales, flip).
#   sh tool/test.sh ade20k pspnet50 [SECTION.key value ...]
#   NPROC=4 sh tool/test.sh cityscapes pspnet101        (shards the list over 4 processes)
# The checkpoint is the experiment's model/train_epoch_<epochs>.pth unless TEST.model_path is given;
# the outputs go to <exp folder>/result/epoch_<n>/<split>/<ss|ms>/ (n: the checkpoint's epoch) and
# the whole terminal output to <exp folder>/test-<time>.out. EXP_ROOT (default exp) moves the
# experiment folder.
set -e
cd "$(dirname "$0")/.."
. tool/experiment.sh
NPROC=${NPROC:-1}
cp tool/test.sh tool/test.py "$config" "$exp_dir"
evaluate "$exp_dir/test-$now.out" "$(launch_command "$NPROC")" "$@"
