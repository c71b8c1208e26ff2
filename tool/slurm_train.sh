#!/bin/bash
# SLURM example: 2 nodes x 8 GPUs, one task per GPU; train.py reads SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID and the node list (MASTER_ADDR = first node, MASTER_PORT 29500 unless set).
#   sbatch tool/slurm_train.sh ade20k pspnet50 [SECTION.key value ...]
# Five minutes before the time limit SLURM sends SIGUSR1 to this script (--signal=B:USR1@300),
# which passes it on to the training tasks: they finish their iteration, save it and exit 75; the
# script then requeues the job (scontrol requeue), and the requeued job continues from that
# iteration (TRAIN.resume auto) without anyone typing a command. Raise the 300 s when one
# iteration plus writing a checkpoint takes longer. A preemption (SIGTERM to the tasks) saves the
# same way; --requeue lets SLURM requeue such a job. EXP_ROOT (default exp) moves the experiment.
#SBATCH --job-name=semseg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail
STOPPED=75   # train.py's status after saving on SIGTERM / SIGUSR1 (util/preemption.py)
dataset=$1
exp_name=$2
shift 2
config=config/${dataset}/${dataset}_${exp_name}.yaml
exp_dir=${EXP_ROOT:-exp}/${dataset}/${exp_name}
mkdir -p "$exp_dir"
cp tool/slurm_train.sh tool/train.py tool/test.py "$config" "$exp_dir"
# What train.py suggests after a crash or preemption: resubmitting, which resumes (as a requeued job does).
SEMSEG_RESUME_COMMAND=$(python -m util.experiment rerun tool/slurm_train.sh "$dataset" "$exp_name" "$@")
export SEMSEG_RESUME_COMMAND

# TRAIN.workers is per node and split across its tasks; resume auto makes a requeued job continue.
srun python tool/train.py --config="$config" TRAIN.save_path "$exp_dir/model" TRAIN.resume auto "$@" &
training=$!
trap 'kill -USR1 "$training" 2>/dev/null || true' USR1   # srun passes the signal on to every task
while :; do   # a trapped signal ends `wait` early: wait again until srun has exited
  status=0
  wait "$training" || status=$?
  kill -0 "$training" 2>/dev/null || break
done
trap - USR1
if [ "$status" -eq "$STOPPED" ]; then
  echo "training saved its iteration and stopped; requeueing job $SLURM_JOB_ID to continue from it"
  scontrol requeue "$SLURM_JOB_ID"
  exit "$status"
fi
[ "$status" -eq 0 ] || exit "$status"

paths=$(python -m util.experiment paths "$config" "$exp_dir" "$@")   # checkpoint and result/epoch_<n>/<split>/<ss|ms>
srun --nodes=1 --ntasks=1 python tool/test.py --config="$config" TRAIN.save_path "$exp_dir/model" \
  TEST.model_path "$(echo "$paths" | sed -n 1p)" TEST.save_folder "$(echo "$paths" | sed -n 2p)" "$@"
