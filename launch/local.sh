#!/usr/bin/env bash
# One machine (workstation, single node): torchrun with one process per GPU; resumes like the SLURM scripts.
#
#   launch/local.sh [dotted.key=value ...]
#   env: NPROC (processes; default: number of GPUs, or 1 without GPUs), CONFIG (default
#        configs/rmt_l.yaml), RUN_DIR (default runs/local: the same command again resumes), SHARDS,
#        PYTHON, DEVICE, SITE_SETUP, NCCL_* (see launch/common.sh and launch/README.md)
# Ctrl-C or SIGTERM to this script: the workers get SIGUSR1, save a checkpoint and exit 75; run the
# same command again to resume. (torchrun itself would SIGTERM them and SIGKILL them after 30 s.)
set -u -o pipefail
RMT_ROOT=${RMT_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
RMT_DEFAULT_CONFIG=configs/rmt_l.yaml
RMT_DEFAULT_RUN_NAME=local
source "$RMT_ROOT/launch/common.sh" || exit 2

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
NPROC=${NPROC:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 1)}
rmt_site_setup
rmt_resolve_settings "${gpus:-0}" "$@"
rmt_nccl_defaults
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
rmt_log "processes: $NPROC; GPUs: ${gpus:-0}; device: $DEVICE; OMP_NUM_THREADS=$OMP_NUM_THREADS"
rmt_log "config: $CONFIG; site setup: $RMT_SITE_SOURCED"
rmt_log "run dir: $RUN_DIR"
rmt_log "resume from: $(rmt_resume_point)"
cd "$RMT_ROOT" || exit 2
rmt_log_batch_plan "$NPROC"
# torchrun must not turn Ctrl-C/SIGTERM into killing its workers: this script handles those.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
signalled=0
# shellcheck disable=SC2317  # called by the trap
on_stop() {
  signalled=1
  rmt_log "stop requested: asking the workers to checkpoint (SIGUSR1)"
  pkill -USR1 -P "$torchrun_pid" || true   # the workers are torchrun's children
}
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
  -m pipeline train "${RMT_TRAIN_ARGS[@]}" &
torchrun_pid=$!
trap on_stop INT TERM USR1
while :; do
  wait "$torchrun_pid"; rc=$?
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
# torchrun reports a worker's exit 75 as its own failure (exit 1); the signal tells them apart.
if [ "$rc" != 0 ] && [ "$signalled" = 1 ]; then rc=$RMT_EXIT_REQUEUE; fi
case "$rc" in
  0) rmt_log "training finished; final checkpoint: $(rmt_resume_point)" ;;
  "$RMT_EXIT_REQUEUE") rmt_log "stopped at checkpoint $(rmt_resume_point); run the same command again to resume" ;;
  *) rmt_log "training FAILED with exit code $rc; run the same command again to resume from $(rmt_resume_point)" ;;
esac
exit "$rc"
