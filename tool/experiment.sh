# Sourced by tool/train.sh and tool/test.sh after `cd` to the repository root: reads
# `<dataset> <exp_name>` from the caller's arguments (shifting them off, so "$@" holds the
# overrides) and sets PYTHON, dataset, exp_name, config, exp_dir (created) and now, the `logged`
# function of tool/logged.sh, `launch_command` and `evaluate`.
if [ $# -lt 2 ]; then
  echo "usage: sh $0 <dataset> <exp_name> [SECTION.key value ...]" >&2
  exit 2
fi
PYTHON=${PYTHON:-python}
dataset=$1
exp_name=$2
shift 2
config=config/${dataset}/${dataset}_${exp_name}.yaml
[ -f "$config" ] || { echo "error: config $config does not exist" >&2; exit 2; }
exp_dir=${EXP_ROOT:-exp}/${dataset}/${exp_name}
mkdir -p "$exp_dir"
now=$(date +%Y%m%d_%H%M%S)
. tool/logged.sh

# launch_command N: how to start N processes of a script: torchrun for more than one, plain $PYTHON
# for one, since torchrun's own report after a Ctrl-C would bury the script's `interrupted` line.
launch_command() {
  if [ "$1" -gt 1 ]; then
    echo "$PYTHON -m torch.distributed.run --standalone --nproc_per_node=$1"
  else
    echo "$PYTHON"
  fi
}

# evaluate OUT_FILE LAUNCH [overrides...]: tool/test.py on the experiment's checkpoint, writing into
# the experiment's result/epoch_<n>/<split>/<ss|ms>/ (util/experiment.py); overrides come last and win.
evaluate() {
  evaluate_out=$1
  evaluate_launch=$2
  shift 2
  evaluate_paths=$($PYTHON -m util.experiment paths "$config" "$exp_dir" "$@")
  evaluate_model=$(echo "$evaluate_paths" | sed -n 1p)
  evaluate_folder=$(echo "$evaluate_paths" | sed -n 2p)
  logged "$evaluate_out" $evaluate_launch tool/test.py --config="$config" TRAIN.save_path "$exp_dir/model" \
    TEST.model_path "$evaluate_model" TEST.save_folder "$evaluate_folder" "$@"
}
