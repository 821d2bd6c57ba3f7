# Sourced by slurm/train_single_node.sbatch and slurm/train_multi_node.sbatch (after they cd to the repository):
# what both jobs do around `accelerate launch`. Not a script to run on its own.
#
# Preemption and time limits, end to end:
# 1. `#SBATCH --signal=B:USR1@N` makes SLURM send SIGUSR1 to this batch shell N seconds before the time limit (the
#    check runs about every 30 s, so it may come up to a minute earlier); an admin or a test can send the same warning
#    with `scancel --signal=USR1 --batch JOBID`.
# 2. The trap below passes it to srun, which forwards it to every task of the training step: one
#    `accelerate launch` per node. The launcher itself ignores SIGUSR1 (it would die of it and leave its workers
#    behind): with one process, the worker is in the step's process group and gets the signal from SLURM directly;
#    with several, torchrun is told to catch SIGUSR1 and pass it to its workers (PET_SIGNALS_TO_HANDLE: torchrun's
#    own setting; it overwrites TORCHELASTIC_SIGNALS_TO_HANDLE from it), then gives them
#    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds before SIGKILL.
# 3. tuneloop finishes the optimizer step, saves a checkpoint on all ranks, writes output_dir/preempted.json and
#    exits with 75 (EX_TEMPFAIL). `accelerate launch` reports any failing worker as 1 (one process or several:
#    accelerate 1.15 raises CalledProcessError or torchrun's ChildFailedError), so the marker file is what counts;
#    it is removed before every launch, so a stale one can never requeue a job.
# 4. This shell then runs `scontrol requeue $SLURM_JOB_ID`; SLURM restarts the same job id with
#    SLURM_RESTART_COUNT=1, 2, ..., and the rerun passes `--resume_from_checkpoint latest`. Logs go on in the same
#    %x-%j.out (--open-mode=append).
# A job that succeeds, fails for a real error, or is cancelled (SIGTERM from scancel; a SLURM that preempts with
# PreemptMode=REQUEUE requeues the job itself) is never requeued by this script.

REQUEUE_EXIT_CODE=75 # tuneloop.preemption.REQUEUE_EXIT_CODE
PREEMPTED_FILE=preempted.json

# How long torchrun waits for workers to save and exit after passing on the signal: keep it under --signal's lead.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}

log() { echo "[$(date +%T) job $SLURM_JOB_ID run $((${SLURM_RESTART_COUNT:-0} + 1))] $*"; }

# Until training starts there is nothing to checkpoint, and bash would die of an untrapped USR1. SLURM sends it at
# once when --time is not longer than the --signal lead time (300 s): run on and let the time limit end the job, as
# requeueing a job that cannot get past its first steps would loop.
trap 'log "SIGUSR1 before training started (is --time longer than the --signal lead time?): ignored"' USR1

# The output_dir train.py will use, resolved from the same arguments the same way (recipe, then flags); a bad
# option fails here, in one line, before any node starts.
resolve_output_dir() {
  python - "$@" <<'PY'
import sys

from tuneloop.config import parse_args
from tuneloop.errors import UserError

try:
    print(parse_args(sys.argv[1:]).train.output_dir)
except UserError as e:
    sys.exit(f"tuneloop: error: {e}")
PY
}

# A port for the rendezvous derived from the job id (a block of 10 per job, one per restart, so a rerun never meets
# a socket its previous run left behind): every node computes the same one without talking to the others.
main_process_port() {
  echo "${TUNELOOP_MAIN_PORT:-$((20000 + (SLURM_JOB_ID % 4000) * 10 + ${SLURM_RESTART_COUNT:-0} % 10))}"
}

# Arguments for train.py: the job's own arguments, plus resume on a requeued run.
train_args() {
  train_args=("$@")
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then train_args+=(--resume_from_checkpoint latest); fi
}

# run_step OUTPUT_DIR SRUN_ARGS... -- LAUNCH_ARGS...: run `accelerate launch LAUNCH_ARGS` on each node of one srun
# step, pass a USR1 warning on, then end the job with the trainer's status or requeue it. Does not return.
run_step() {
  local output_dir=$1 srun_args=() status
  shift
  while [ "$1" != "--" ]; do srun_args+=("$1"); shift; done
  shift
  rm -f "$output_dir/$PREEMPTED_FILE"
  # `trap "" USR1` before exec: the launcher inherits SIGUSR1 as ignored (see 2. above). $SLURM_NODEID is expanded
  # by each task (0 on the first node), so every node gets its own machine rank. srun is given --cpus-per-task
  # explicitly: Slurm 22.05's srun no longer takes it from the job. --unbuffered: the progress bar redraws its line
  # without a newline, and line-buffered output would show it in the log only at the end.
  srun --unbuffered --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} "${srun_args[@]}" \
    bash -c 'trap "" USR1; exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' accelerate-launch "$@" &
  step=$!
  warned=0 cancelled=0 interrupted=0
  trap 'interrupted=1 warned=1; log "SIGUSR1: time limit or preemption ahead; asking the trainer to checkpoint and stop"; kill -USR1 "$step"' USR1
  trap 'interrupted=1 cancelled=1; log "SIGTERM: the job is being cancelled; the trainer got it too"' TERM
  # A trapped signal makes `wait` return early; wait again until the step has really ended.
  while :; do
    interrupted=0
    wait "$step"
    status=$?
    [ "$interrupted" = 1 ] || break
  done
  trap 'log "SIGUSR1 after training ended: ignored"' USR1
  trap - TERM

  if [ "$status" = 0 ]; then
    log "training finished"
    exit 0
  elif [ "$cancelled" = 1 ]; then
    log "training stopped (status $status) by a cancel: not requeuing"
    exit "$status"
  elif [ "$status" = "$REQUEUE_EXIT_CODE" ] || [ -f "$output_dir/$PREEMPTED_FILE" ]; then
    log "checkpoint saved (status $status, $(cat "$output_dir/$PREEMPTED_FILE" 2>/dev/null)); requeuing"
    # SLURM kills this shell once the requeue is accepted: it must be the last thing the job does.
    if scontrol requeue "$SLURM_JOB_ID"; then
      log "requeued: job $SLURM_JOB_ID will run again and resume from the checkpoint"
      exit 0
    fi
    log "scontrol requeue failed: the job is not requeueable (sbatch --requeue; JobRequeue=0 clusters need it)"
    exit "$status"
  else
    log "training failed (status $status$([ "$warned" = 1 ] && echo ', after a warning, with no checkpoint')): not requeuing"
    exit "$status"
  fi
}
