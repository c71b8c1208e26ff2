#!/bin/sh
# Evaluate an experiment with its config's TEST settings (model_path, save_folder, scales).
#   sh tool/test.sh ade20k pspnet50 [SECTION.key value ...]
#   NPROC=4 sh tool/test.sh cityscapes pspnet101        (shards the list over 4 processes)
# The whole terminal output also goes to <exp folder>/test-<time>.out; EXP_ROOT (default exp) moves
# the experiment folder.
set -e
cd "$(dirname "$0")/.."
. tool/experiment.sh
NPROC=${NPROC:-1}
cp tool/test.sh tool/test.py "$config" "$exp_dir"
logged "$exp_dir/test-$now.out" \
  $PYTHON -m torch.distributed.run --standalone --nproc_per_node="$NPROC" tool/test.py --config="$config" "$@"
