#!/usr/bin/env bash
# Train on one machine with several GPUs: one process per GPU (default) or one for all of them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --config CONFIG --workdir WORKDIR [--gpus N] [--single-process] [--config.KEY=VALUE ...]

Starts, on this machine, N processes (N = the GPUs CUDA_VISIBLE_DEVICES names, else the GPUs
nvidia-smi lists, or --gpus), one per GPU:

  env JAX_LOCAL_DEVICE_IDS=i PYTHON -m unitoken_jax.train --config CONFIG --workdir WORKDIR \\
      --coordinator localhost:PORT --num_processes N --process_id i [--config.KEY=VALUE ...]

JAX's GPU guide recommends one process per GPU rather than one per machine (it can make jitted
steps faster), and that is also what jax.distributed.initialize sets up by itself under SLURM, so
this host and a SLURM cluster run the same way. jax.distributed.initialize reads
JAX_LOCAL_DEVICE_IDS, so process i drives GPU i only. --single-process starts one process that
drives every local GPU instead (no coordinator); try both if speed matters.

Each process logs to LOG_DIR/process-i.log; process 0's log (the metrics) is shown here too.
Ctrl-C or SIGTERM is passed on to every process: the run saves a checkpoint and stops. The same
command again resumes from the latest checkpoint in WORKDIR.

  --config CONFIG      a stage config, e.g. configs/stage2.py (run from the repository root)
  --workdir WORKDIR    checkpoints, metrics and the final model: a directory (not a gs:// URL;
                       a bucket mounted with Cloud Storage FUSE is fine)
  --config.KEY=VALUE   config overrides, passed on as they are (repeatable)
  --gpus N             how many GPUs (default: those CUDA_VISIBLE_DEVICES names, else nvidia-smi -L's)
  --single-process     one process for all GPUs
  --port PORT          the coordinator's port on localhost (default $PORT)
  --python PYTHON      the Python with unitoken_jax and jax[cuda12] installed (default: $PYTHON)
  --env NAME=VALUE     an environment variable for every process (repeatable)
  --log-dir DIR        where the per-process logs go (default: $LOG_DIR, here)
  --dry-run            print the commands, one per process, run nothing
  -h, --help           this text
EOF
}

parse_args "train gpu" "$@"
check_train_options
require_int "$PORT" --port
if ((SINGLE_PROCESS)) && [[ -n $GPUS ]]; then  # (it was ignored: the one process drives every visible GPU)
  die "--gpus has no use with --single-process, whose one process drives every visible GPU;" \
    "choose them with CUDA_VISIBLE_DEVICES"
fi
if [[ -z $GPUS && -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
  # the GPUs the processes can see (nvidia-smi lists every GPU of the machine; JAX numbers the
  # visible ones from 0, which JAX_LOCAL_DEVICE_IDS below counts in)
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  GPUS=${#visible[@]}
elif [[ -z $GPUS ]]; then
  command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found; give --gpus N"
  GPUS=$(nvidia-smi -L | grep -c '^GPU ') || true
fi
require_int "$GPUS" --gpus
((GPUS >= 1)) || die "no GPU found (--gpus $GPUS)"

env_words=(env ${ENV_VARS[@]+"${ENV_VARS[@]}"})
commands=()  # one shell-quoted command line per process
if ((SINGLE_PROCESS)); then
  make_train_command "$PYTHON"
  commands+=("$(quote_cmd "${env_words[@]}" "${TRAIN_CMD[@]}")")
else
  for ((i = 0; i < GPUS; i++)); do
    make_train_command "$PYTHON" --coordinator "localhost:$PORT" --num_processes "$GPUS" --process_id "$i"
    commands+=("$(quote_cmd "${env_words[@]}" "JAX_LOCAL_DEVICE_IDS=$i" "${TRAIN_CMD[@]}")")
  done
fi

if ((DRY_RUN)); then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
stopping=0
stop_all() {  # stop_all WHY
  ((stopping)) && return 0
  stopping=1
  kill -TERM "${pids[@]}" 2>/dev/null || true
  note "$1: SIGTERM to every process" || true  # (a closed terminal takes no more lines)
}
trap 'stop_all "interrupted (the processes save a checkpoint, then stop)"' INT TERM
# a closed terminal or ssh session: the processes (in sessions of their own) would train on
# unwatched, one failing leaving the others waiting in a collective; run this in tmux to keep it going
trap 'stop_all "the terminal closed (SIGHUP): the processes save a checkpoint, then stop"' HUP
alive() {  # a process that has not exited (an exited, unreaped child shows as a zombie, Z)
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $stat != Z* ]]
}

for ((i = 0; i < ${#commands[@]}; i++)); do
  log="$LOG_DIR/process-$i.log"
  note "process $i: ${commands[$i]}  (log: $log)"
  # exec: the pid is the training process itself; setsid: Ctrl-C reaches only this script, which
  # passes SIGTERM on (the run saves on SIGTERM; a SIGINT would just kill it)
  eval "exec setsid ${commands[$i]}" >>"$log" 2>&1 </dev/null &
  pids+=("$!")
done
tail -n +1 -F "$LOG_DIR/process-0.log" 2>/dev/null &
tail_pid=$!

# One process that fails leaves the others waiting in a collective: stop them all then.
failed=() finished=() remaining=${#pids[@]}
while ((remaining > 0)); do
  for ((i = 0; i < ${#pids[@]}; i++)); do
    [[ -z ${finished[$i]:-} ]] || continue
    alive "${pids[$i]}" && continue
    if wait "${pids[$i]}"; then rc=0; else rc=$?; fi
    finished[i]=1
    remaining=$((remaining - 1))
    if ((rc != 0)); then
      failed+=("process $i (exit $rc, log $LOG_DIR/process-$i.log)")
      stop_all "process $i failed (exit $rc)"
    fi
  done
  ((remaining == 0)) || sleep 0.5
done
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true

if [[ -n ${failed[*]+x} ]]; then
  note "failed: ${failed[*]}"
  exit 1
fi
note "all ${#pids[@]} processes finished"
