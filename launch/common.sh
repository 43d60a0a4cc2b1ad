# Shared logic of the launch scripts: settings, SLURM -> torch.distributed, srun, signals, requeue.
#
# Sourced (never run) by launch/rmt_l_64gpu.sh, launch/rmt_b_32gpu.sh and launch/local.sh after they
# set RMT_ROOT (the repository), RMT_DEFAULT_CONFIG and RMT_DEFAULT_RUN_NAME. See launch/README.md.
#
# Environment (all optional):
#   CONFIG        recipe YAML                      (default: the script's own, e.g. configs/rmt_l.yaml)
#   RUN_DIR       output dir; same dir = resume    (default: runs/<script name> in the repository)
#   SHARDS        OUT folder of `make shards`      (default: the config's data.root)
#   PYTHON        interpreter or wrapper           (default: .venv/bin/python if present, else python3)
#   DEVICE        cpu | cuda | auto                (default: cpu when the job has 0 GPUs per node, else auto)
#   MASTER_PORT   rendezvous port                  (default: 20000 + job id % 20000)
#   MAX_REQUEUES  requeues before giving up        (default: 20)
#   SRUN_WAIT     seconds srun waits for the other tasks once one has exited (default: 120)
#   SRUN_ARGS     extra srun options (containers: --container-image=...; bindings; ...)
#   PREFLIGHT_TIMEOUT  seconds rank 0's preflight waits for every rank to check in (default: 60)
#   SITE_SETUP    file sourced before training (module loads, conda, NCCL site settings)
#                 (default: launch/site.sh when it exists)
#   NCCL_*        passed through; NCCL_DEBUG defaults to WARN (see launch/README.md)
# shellcheck shell=bash

# The trainer's exit codes (run contract): 0 finished, 75 checkpointed on a signal: requeue me.
# The source of truth is pipeline/errors.py (EXIT_REQUEUE); tests/test_run_dir.py checks they agree
# (asking Python here would cost a start-up before PYTHON is even resolved).
RMT_EXIT_REQUEUE=75

rmt_log() { printf '[launch %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
rmt_fail() { rmt_log "error: $*"; exit 2; }

# Absolute path of $1, relative paths taken from the submit directory (the job's start directory).
rmt_abspath() { realpath -m -- "$1"; }

# Resolve CONFIG / RUN_DIR / SHARDS / PYTHON / DEVICE and build RMT_TRAIN_ARGS (the trainer's argv
# after `python -m pipeline train`). $1: GPUs per node as the scheduler sees them ("" = unknown).
rmt_resolve_settings() {
  local gpus_per_node=$1; shift
  CONFIG=$(rmt_abspath "${CONFIG:-$RMT_ROOT/$RMT_DEFAULT_CONFIG}")
  RUN_DIR=$(rmt_abspath "${RUN_DIR:-$RMT_ROOT/runs/$RMT_DEFAULT_RUN_NAME}")
  [ -f "$CONFIG" ] || rmt_fail "CONFIG=$CONFIG does not exist; set CONFIG to a recipe file such as configs/rmt_l.yaml"
  if [ -n "${SHARDS:-}" ]; then
    SHARDS=$(rmt_abspath "$SHARDS")
    [ -f "$SHARDS/manifest.json" ] || \
      rmt_fail "SHARDS=$SHARDS has no manifest.json; point SHARDS at the OUT folder of 'make shards'"
  fi
  if [ -z "${PYTHON:-}" ]; then
    if [ -x "$RMT_ROOT/.venv/bin/python" ]; then PYTHON=$RMT_ROOT/.venv/bin/python; else PYTHON=python3; fi
  fi
  if [ -z "${DEVICE:-}" ]; then
    if [ "$gpus_per_node" = 0 ]; then DEVICE=cpu; else DEVICE=auto; fi
  fi
  case "$DEVICE" in cpu|cuda|auto) ;; *) rmt_fail "DEVICE=$DEVICE is not one of cpu, cuda, auto" ;; esac
  RMT_TRAIN_ARGS=(--config "$CONFIG" "output_dir=$RUN_DIR")
  [ -n "${SHARDS:-}" ] && RMT_TRAIN_ARGS+=("data.root=$SHARDS")
  RMT_TRAIN_ARGS+=("train.device=$DEVICE")
  RMT_TRAIN_ARGS+=("$@")
}

# Log how the recipe's global batch is made at world size $1 (world x micro-batch x accumulation) and the
# peak LR; a world size that cannot divide the global batch stops here, before srun. Run from $RMT_ROOT.
rmt_log_batch_plan() {
  local plan
  plan=$("$PYTHON" -m pipeline schedule --plan --world-size "$1" "${RMT_TRAIN_ARGS[@]}" 2>&1) || rmt_fail "${plan#error: }"
  rmt_log "batch: $plan"
}

# The checkpoint tag a start would resume from, or "none (fresh start)".
rmt_resume_point() {
  local point
  point=$("$PYTHON" -m pipeline run-dir "$RUN_DIR" resume-point) || point=""
  if [ -n "$point" ]; then echo "$point"; else echo "none (fresh start)"; fi
}

# Source the site's setup file (modules, environments, PYTHON, NCCL_*) before anything is resolved.
rmt_site_setup() {
  local site=${SITE_SETUP:-$RMT_ROOT/launch/site.sh}
  RMT_SITE_SOURCED="none"
  if [ -n "${SITE_SETUP:-}" ] && [ ! -f "$site" ]; then rmt_fail "SITE_SETUP=$site does not exist"; fi
  if [ -f "$site" ]; then
    # shellcheck disable=SC1090
    source "$site" || rmt_fail "sourcing $site failed"
    RMT_SITE_SOURCED=$site
  fi
}

rmt_nccl_defaults() {
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Fail a collective with an error instead of hanging when a peer dies (torch >= 2.2 name).
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
}

# ---- SLURM batch job ------------------------------------------------------------------------------

# SIGUSR1 to the batch shell: remember it, leave it in $RMT_STOP_REQUEST, then (while the trainer runs)
# send it to the tasks. A task ignores USR1 until Python installs its handler (see rmt_srun), so a copy
# sent in the first seconds of a start is lost; the trainer reads the file right after installing its
# handler, so the file catches what arrived before, the handler what arrives after. No copy after the
# trainer ends: Python restores the default action while it shuts down, and USR1 would kill it.
rmt_on_usr1() {
  RMT_EARLY_SIGNAL=1
  if [ -n "${RMT_STOP_REQUEST:-}" ]; then : > "$RMT_STOP_REQUEST"; fi
  if [ "${RMT_SRUN_WHAT:-}" = train ] && [ -n "${RMT_SRUN_PID:-}" ]; then
    rmt_log "SIGUSR1 (time limit or preemption warning): forwarding to the training tasks"
    kill -USR1 "$RMT_SRUN_PID" 2>/dev/null || true
  fi
}

rmt_requeue_or_stop() { # $1: why
  local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-20}
  if [ "$restarts" -ge "$max" ]; then
    rmt_log "NOT requeuing: this job was already requeued $restarts times (MAX_REQUEUES=$max)."
    rmt_log "To continue, submit the same command again (resume point: $(rmt_resume_point))"
    return "$RMT_EXIT_REQUEUE"
  fi
  rmt_log "$1: requeuing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $max);" \
    "it will resume from $(rmt_resume_point)"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    rmt_log "scontrol requeue failed (job submitted with --no-requeue?). Submit the same command again to resume."
    return "$RMT_EXIT_REQUEUE"
  fi
  return 0
}

# Run "$@" as every task of the job under srun (RANK/LOCAL_RANK set); $1: what (for the USR1 trap),
# $2: srun --kill-on-bad-exit. Sets RMT_SRUN_RC. A task ignores USR1 until the program installs its own
# handler (an ignored signal stays ignored across exec): a default USR1 would kill it.
rmt_srun() {
  RMT_SRUN_WHAT=$1
  local srun_opts=(--ntasks="$SLURM_NTASKS" --label --kill-on-bad-exit="$2" --wait="${SRUN_WAIT:-120}")
  shift 2
  # srun does not inherit --cpus-per-task from sbatch since SLURM 22.05.
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  # shellcheck disable=SC2086,SC2016  # SRUN_ARGS is a list of options; $SLURM_* expand in each task
  srun "${srun_opts[@]}" ${SRUN_ARGS:-} \
    bash -c "trap '' USR1; "'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec "$@"' rmt-task "$@" &
  RMT_SRUN_PID=$!
  # A trap runs only while the shell waits; `wait` then returns early, so wait until srun is gone.
  while :; do
    wait "$RMT_SRUN_PID"; RMT_SRUN_RC=$?
    kill -0 "$RMT_SRUN_PID" 2>/dev/null || break
  done
  RMT_SRUN_PID=
  RMT_SRUN_WHAT=
  [ "$RMT_SRUN_RC" = 0 ]
}

# Log what the trainer's exit code $1 means and requeue on 75; returns the job's exit status.
rmt_training_outcome() {
  case "$1" in
    0) rmt_log "training finished (exit 0); final checkpoint: $(rmt_resume_point)" ;;
    "$RMT_EXIT_REQUEUE") rmt_requeue_or_stop "training stopped after saving a checkpoint (exit 75)"
       return $? ;;
    *) rmt_log "training FAILED with exit code $1; NOT requeued (a real error would fail again)."
       rmt_log "Fix the cause, then submit the same command again (resume point: $(rmt_resume_point))" ;;
  esac
  return "$1"
}

# Run the trainer under srun, one task per GPU. Arguments: trainer overrides (dotted.key=value).
rmt_slurm_main() {
  set -u -o pipefail
  [ -n "${SLURM_JOB_ID:-}" ] || rmt_fail "not inside a SLURM job: submit with 'sbatch $0', or use launch/local.sh"
  RMT_EARLY_SIGNAL=${RMT_EARLY_SIGNAL:-0}  # the batch script's first-line trap may have set it
  RMT_SRUN_PID=
  trap rmt_on_usr1 USR1

  rmt_site_setup
  rmt_resolve_settings "${SLURM_GPUS_PER_NODE:-}" "$@"
  local logs
  # the run dir's layout is Python's (pipeline/train/run_dir.py): asked once per start, never in a loop
  logs=$("$PYTHON" -m pipeline run-dir "$RUN_DIR" logs) || rmt_fail "$PYTHON -m pipeline run-dir failed"
  mkdir -p "$logs" || rmt_fail "cannot create RUN_DIR=$RUN_DIR; set RUN_DIR to a writable folder"
  # read by the trainer (pipeline/train/loop.py StopFlag); this start's request only
  export RMT_STOP_REQUEST="$logs/stop-requested-$SLURM_JOB_ID"
  rm -f "$RMT_STOP_REQUEST"
  # Everything below also goes to the run dir (the #SBATCH --output file cannot name it).
  exec > >(tee -a "$logs/slurm-$SLURM_JOB_ID.out") 2>&1
  local tee_pid=$!

  rmt_nccl_defaults
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  RMT_NODE_HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)
  export RMT_NODE_HOSTS  # the job's hosts in order: preflight names the host of a missing rank
  export MASTER_ADDR=${RMT_NODE_HOSTS%%,*}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export WORLD_SIZE=$SLURM_NTASKS

  rmt_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME), start $((${SLURM_RESTART_COUNT:-0} + 1))" \
    "(requeued ${SLURM_RESTART_COUNT:-0} times, at most ${MAX_REQUEUES:-20})"
  rmt_log "nodes: $SLURM_JOB_NUM_NODES ($SLURM_JOB_NODELIST); tasks: $SLURM_NTASKS" \
    "(world size $WORLD_SIZE); GPUs per node: ${SLURM_GPUS_PER_NODE:-none requested}; device: $DEVICE"
  rmt_log "CPUs per task: ${SLURM_CPUS_PER_TASK:-unset}; OMP_NUM_THREADS=$OMP_NUM_THREADS"
  rmt_log "master: $MASTER_ADDR:$MASTER_PORT"
  rmt_log "config: $CONFIG"
  rmt_log "run dir: $RUN_DIR"
  rmt_log "shards: ${SHARDS:-data.root of the config}"
  rmt_log "resume from: $(rmt_resume_point)"
  rmt_log "python: $PYTHON; site setup: $RMT_SITE_SOURCED"
  rmt_log "NCCL: $(env | grep -E '^(TORCH_)?NCCL_' | sort | tr '\n' ' ')"
  rmt_log "train: $PYTHON -m pipeline train ${RMT_TRAIN_ARGS[*]}"

  cd "$RMT_ROOT" || rmt_fail "cannot cd to $RMT_ROOT"
  rmt_log_batch_plan "$WORLD_SIZE"
  local status
  # A preflight that fails (a rank cannot reach the others) ends the job at once with exit 1, not requeued.
  # srun's own code is the highest of its tasks': 1 from the rank that failed, or 143 (SIGTERM) when srun
  # had to end ranks still waiting (--kill-on-bad-exit), which is the usual case with several ranks.
  # A USR1 already received skips preflight: requeue at once.
  if [ "$RMT_EARLY_SIGNAL" = 0 ] && ! rmt_srun preflight 1 "$PYTHON" -m pipeline preflight \
      --device "$DEVICE" --timeout-s "${PREFLIGHT_TIMEOUT:-60}"; then
    rmt_log "preflight FAILED (srun exit $RMT_SRUN_RC); NOT training, NOT requeued (job exit 1):" \
      "the lines above name the host."
    status=1
  elif [ "$RMT_EARLY_SIGNAL" = 1 ]; then
    rmt_requeue_or_stop "SIGUSR1 before training started"; status=$?
  else
    rmt_srun train 0 "$PYTHON" -m pipeline train "${RMT_TRAIN_ARGS[@]}"
    rmt_training_outcome "$RMT_SRUN_RC"; status=$?
  fi
  exec >&- 2>&-
  wait "$tee_pid" 2>/dev/null
  return "$status"
}
