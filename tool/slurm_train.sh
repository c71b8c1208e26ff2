#!/bin/bash
# SLURM example: 2 nodes x 8 GPUs, one task per GPU; train.py reads SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID and the node list (MASTER_ADDR = first node, MASTER_PORT 29500 unless set).
#   sbatch tool/slurm_train.sh ade20k pspnet50 [SECTION.key value ...]
#SBATCH --job-name=semseg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
dataset=$1
exp_name=$2
shift 2
config=config/${dataset}/${dataset}_${exp_name}.yaml
exp_dir=exp/${dataset}/${exp_name}
mkdir -p "$exp_dir"
cp tool/slurm_train.sh tool/train.py tool/test.py "$config" "$exp_dir"
# What train.py suggests after a crash or preemption: resubmitting, which resumes (as a requeued job does).
SEMSEG_RESUME_COMMAND=$(python -m util.experiment rerun tool/slurm_train.sh "$dataset" "$exp_name" "$@")
export SEMSEG_RESUME_COMMAND
# TRAIN.workers is per node and split across its tasks; resume auto makes a requeued job continue.
srun python tool/train.py --config="$config" TRAIN.save_path "$exp_dir/model" TRAIN.resume auto "$@"
paths=$(python -m util.experiment paths "$config" "$exp_dir" "$@")   # checkpoint and result/epoch_<n>/<split>/<ss|ms>
srun --nodes=1 --ntasks=1 python tool/test.py --config="$config" TRAIN.save_path "$exp_dir/model" \
  TEST.model_path "$(echo "$paths" | sed -n 1p)" TEST.save_folder "$(echo "$paths" | sed -n 2p)" "$@"
