#!/usr/bin/env bash
# Follow the training log of one worker (default 0) or of all workers of a TPU slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --project PROJECT [--worker N|all] [--lines N] [--no-follow]

Shows the last lines of ~/$LOG_DIR/train.log (written by tpu_train.sh) on a worker and follows it
until you press Ctrl-C, which stops only the viewing, never the run. Worker 0 logs the metrics;
with --worker all every line starts with the worker's host name.

  --worker N|all     which worker (default 0)
  --lines N          how many earlier lines to show first (default $TAIL_LINES)
  --no-follow        print them and return
  --log-dir DIR      the log directory on the workers, relative to home (default $LOG_DIR)
  --name NAME        the queued resource's name (required)
  --node-id ID       the TPU node's name (default: NAME)
  --zone ZONE        (default: \$CLOUDSDK_COMPUTE_ZONE)
  --project PROJECT  (default: \$CLOUDSDK_CORE_PROJECT)
  --dry-run          print the command, run nothing
  -h, --help         this text
EOF
}

parse_args "tpu logs" "$@"
check_tpu_options
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker takes a worker number or 'all' (got '$WORKER')"
require_int "$TAIL_LINES" --lines
require_remote_path "$LOG_DIR" --log-dir

tail_cmd="tail -n $TAIL_LINES"
((!FOLLOW)) || tail_cmd="$tail_cmd -F"
tail_cmd="$tail_cmd $(remote_path "$LOG_DIR")/train.log"
[[ $WORKER != all ]] || tail_cmd="$tail_cmd | sed -u \"s/^/[\$(hostname)] /\""
run gcloud compute tpus tpu-vm ssh "$NODE_ID" "${WHERE[@]}" "--worker=$WORKER" "--command=$tail_cmd"
