#!/usr/bin/env bash
# RMT-L (configs/rmt_l.yaml) on 8 nodes x 8 GPUs, one task per GPU, DeepSpeed ZeRO; requeues itself.
#
#   sbatch [sbatch options] launch/rmt_l_64gpu.sh [dotted.key=value ...]
#   env: CONFIG, RUN_DIR (default runs/rmt_l_64gpu: the same command again resumes), SHARDS, ...
#   RMT-L* (token labeling; SHARDS written with LABELS=, README "Token labeling"):
#     CONFIG=configs/rmt_l_tl.yaml RUN_DIR=runs/rmt_l_tl SHARDS=shards/imagenet1k-tl sbatch launch/rmt_l_64gpu.sh
#   CPU test: sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 launch/rmt_l_64gpu.sh
# Options given to sbatch override this header. All settings: launch/common.sh and launch/README.md.
#
#SBATCH --job-name=rmt_l_64gpu
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# ---- set these for your cluster (remove one '#' to enable) ----
##SBATCH --partition=gpu
##SBATCH --account=my_project
##SBATCH --constraint=h100

# First: a USR1 (preemption warning) before common.sh's trap is in must not kill this shell.
trap 'RMT_EARLY_SIGNAL=1' USR1
# sbatch runs a copy of this file; the original's path (hence the repository) comes from scontrol;
# scontrol shows it as Command=<path> <args...>.
RMT_SCRIPT=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=//p')
[ $# -gt 0 ] && RMT_SCRIPT=${RMT_SCRIPT%" $*"}
[ -f "$RMT_SCRIPT" ] || RMT_SCRIPT=${BASH_SOURCE[0]}
RMT_ROOT=${RMT_ROOT:-$(cd "$(dirname "$RMT_SCRIPT")/.." && pwd)}
RMT_DEFAULT_CONFIG=configs/rmt_l.yaml
RMT_DEFAULT_RUN_NAME=rmt_l_64gpu
source "$RMT_ROOT/launch/common.sh" || exit 2
rmt_slurm_main "$@"
