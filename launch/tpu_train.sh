#!/usr/bin/env bash
# Start (or stop) one training run on every worker of a TPU slice at once.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

STOP_WAIT_SECONDS=1800  # a 7B's checkpoint through gcsfuse takes minutes

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --project PROJECT --config CONFIG --workdir WORKDIR [--config.KEY=VALUE ...]
       $PROG --name NAME --zone ZONE --project PROJECT --stop

Starts the same command on every worker at once (gcloud compute tpus tpu-vm ssh --worker=all):

  python -m unitoken_jax.train --config CONFIG --workdir WORKDIR --distributed [--config.KEY=VALUE ...]

--distributed makes each worker call jax.distributed.initialize(), which finds the other workers
of a TPU slice by itself (no coordinator flags). The run is detached from ssh (setsid nohup), so
this returns at once; each worker logs to ~/$LOG_DIR/train.log (follow it with tpu_logs.sh) and
keeps the run's pid in ~/$LOG_DIR/train.pid. A worker where a run is still going refuses to start
a second one. The run resumes from the latest checkpoint in WORKDIR, so after a preemption the
same command on a new slice goes on where the run stopped (tpu_resume.sh does that).

  --config CONFIG        a stage config, relative to the repository, e.g. configs/stage2.py
  --workdir WORKDIR      checkpoints, metrics and the final model: an absolute path that every
                         worker shares and that outlives the slice, i.e. in a bucket mounted with
                         tpu_install.sh --bucket, e.g. /mnt/my-bucket/unitoken/stage2. Not a gs://
                         URL: the training loop writes through the file system. Each worker checks
                         before starting that WORKDIR is not on its own boot disk (a bucket that
                         is not mounted there), and refuses to start if it is.
  --config.KEY=VALUE     config overrides, passed on as they are (repeatable)
  --env NAME=VALUE       an environment variable for the run, e.g. --env LIBTPU_INIT_ARGS=... (repeatable)
  --stop                 send SIGTERM to the run on every worker: JAX's preemption notice makes all
                         workers save a checkpoint at the same step, then the run stops; waits
                         until it has exited on every worker (at most ${STOP_WAIT_SECONDS}s), so
                         that the same command started again right after finds no run going
  --name NAME            the queued resource's name (required)
  --node-id ID           the TPU node's name (default: NAME)
  --zone ZONE            (default: \$CLOUDSDK_COMPUTE_ZONE)
  --project PROJECT      (default: \$CLOUDSDK_CORE_PROJECT)
  --remote-dir DIR       the code on each worker, relative to home (default $REMOTE_DIR)
  --venv DIR             the virtualenv on each worker, relative to home (default $VENV_DIR)
  --log-dir DIR          logs and pid file on each worker, relative to home (default $LOG_DIR)
  --dry-run              print the command, run nothing
  -h, --help             this text

Example:
  $PROG --name unitoken-v5p --zone us-east5-a --project my-project \\
      --config configs/stage2.py --workdir /mnt/my-bucket/unitoken/stage2 \\
      --config.data.sources=/mnt/my-bucket/data/stage2.yaml \\
      --config.init_from.paths=/mnt/my-bucket/UniToken-base-StageI
EOF
}

parse_args "tpu train stop" "$@"
check_tpu_options
require_remote_path "$REMOTE_DIR" --remote-dir
require_remote_path "$VENV_DIR" --venv
require_remote_path "$LOG_DIR" --log-dir

code=$(remote_path "$REMOTE_DIR")
logs=$(remote_path "$LOG_DIR")
ssh_all=(gcloud compute tpus tpu-vm ssh "$NODE_ID" "${WHERE[@]}" --worker=all)
# the pid in train.pid, if that process is still a training run
running="pid=\$(cat $logs/train.pid 2>/dev/null || true); [ -n \"\$pid\" ]"
running="$running && tr '\\000' ' ' < /proc/\$pid/cmdline 2>/dev/null | grep -q unitoken_jax.train"

if ((STOP)); then
  if [[ -n $CONFIG || -n $WORKDIR || -n ${OVERRIDES[*]+x} ]]; then
    die "--stop takes no --config, --workdir or overrides"
  fi
  # then waits until the run has saved and exited on this worker (a restart right after --stop found
  # it still saving on some workers and started on the others alone); a zombie has no cmdline, so
  # `running` is false for a run that has exited
  stop="kill -TERM \$pid && echo \"\$(hostname): sent SIGTERM to the run (pid \$pid); waiting for it to save and exit\""
  stop="$stop; i=0; while $running && [ \$i -lt $STOP_WAIT_SECONDS ]; do sleep 1; i=\$((i+1)); done"
  stop="$stop; if $running; then echo \"\$(hostname): the run (pid \$pid) is still going after"
  stop="$stop ${STOP_WAIT_SECONDS}s; see its log (launch/tpu_logs.sh)\" >&2; exit 1; fi"
  stop="$stop; echo \"\$(hostname): the run has exited\""
  run "${ssh_all[@]}" "--command=if $running; then $stop; else echo \"\$(hostname): no run going\"; fi"
  exit 0
fi

check_train_options
check_tpu_workdir

make_train_command "$(remote_path "$VENV_DIR")/bin/python" --distributed
env_words=(env PYTHONUNBUFFERED=1 ${ENV_VARS[@]+"${ENV_VARS[@]}"})
# the python path stays unquoted so that the worker's shell expands $HOME in it
start="$(quote_cmd "${env_words[@]}") setsid nohup ${TRAIN_CMD[0]} $(quote_cmd "${TRAIN_CMD[@]:1}")"
started="started: $(quote_cmd "${TRAIN_CMD[@]}")"

remote="set -e; mkdir -p $logs"
refuse="echo \"\$(hostname): a run is still going here (pid \$pid); stop it first with launch/tpu_train.sh --stop\" >&2"
remote="$remote; if $running; then $refuse; exit 1; fi"
# The workdir (or, before the first run, its nearest existing parent) must not be on the boot disk:
# there each worker would keep its own part of every checkpoint, lost with the slice.
wd=$(shell_quote "$WORKDIR")
local_disk="echo \"\$(hostname): --workdir $WORKDIR is on this worker's boot disk, not on a file system"
local_disk="$local_disk that all workers share: is the bucket mounted? (launch/tpu_install.sh --bucket BUCKET)\" >&2"
remote="$remote; d=$wd; while [ ! -e \"\$d\" ]; do d=\$(dirname \"\$d\"); done"
remote="$remote; if [ \"\$(df -P \"\$d\" | awk 'NR == 2 {print \$6}')\" = / ]; then $local_disk; exit 1; fi"
remote="$remote; cd $code"
remote="$remote; { echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) \$(hostname)\"; printf '%s\\n' $(shell_quote "$started"); } >> $logs/train.log"
remote="$remote; $start >> $logs/train.log 2>&1 < /dev/null & echo \$! > $logs/train.pid"
shown=$LOG_DIR
# shellcheck disable=SC2088  # (a ~ to show, as the worker's user reads it)
[[ $shown == /* ]] || shown="~/$shown"  # (an absolute --log-dir is shown as it is, not as ~//var/...)
remote="$remote; echo \"\$(hostname): started pid \$!, log $shown/train.log\""
run "${ssh_all[@]}" "--command=$remote"
