#!/bin/sh
# Evaluate an experiment with its config's TEST settings (model_path, save_folder, scales).
#   sh tool/test.sh ade20k pspnet50 [SECTION.key value ...]
#   NPROC=4 sh tool/test.sh cityscapes pspnet101        (shards the list over 4 processes)
# The whole terminal output also goes to <exp folder>/test-<time>.out; EXP_ROOT (default exp) moves
# the experiment folder.
set -e
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: sh tool/test.sh <dataset> <exp_name> [SECTION.key value ...]" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
dataset=$1
exp_name=$2
shift 2
config=config/${dataset}/${dataset}_${exp_name}.yaml
[ -f "$config" ] || { echo "error: config $config does not exist" >&2; exit 2; }
NPROC=${NPROC:-1}
exp_dir=${EXP_ROOT:-exp}/${dataset}/${exp_name}
mkdir -p "$exp_dir"
cp tool/test.sh tool/test.py "$config" "$exp_dir"
. tool/logged.sh
logged "$exp_dir/test-$(date +%Y%m%d_%H%M%S).out" \
  $PYTHON -m torch.distributed.run --standalone --nproc_per_node="$NPROC" tool/test.py --config="$config" "$@"
