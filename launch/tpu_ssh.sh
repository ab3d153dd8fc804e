#!/usr/bin/env bash
# Run one shell command on every worker (or one worker) of a TPU slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --project PROJECT [--worker N|all] -- COMMAND ...

Runs COMMAND in the home directory of every worker at once (gcloud compute tpus tpu-vm ssh
--worker=all --command=...), e.g. to copy checkpoints or data to each worker's disk. COMMAND is a
line for the worker's shell: several words are joined with spaces, as ssh joins them, so quote a
path with spaces inside the line ('ls "/mnt/my bucket"'), not only for this shell:

  $PROG --name unitoken-v5p --zone us-east5-a --project my-project -- \\
      'mkdir -p /tmp/unitoken && gcloud storage cp -r gs://my-bucket/UniToken-base-StageI /tmp/unitoken/'

  --worker N|all     which workers (default all)
  --name NAME        the queued resource's name (required)
  --node-id ID       the TPU node's name (default: NAME)
  --zone ZONE        (default: \$CLOUDSDK_COMPUTE_ZONE)
  --project PROJECT  (default: \$CLOUDSDK_CORE_PROJECT)
  --dry-run          print the command, run nothing
  -h, --help         this text
EOF
}

WORKER=all
parse_args "tpu ssh" "$@"
check_tpu_options
[[ $WORKER == all || $WORKER =~ ^[0-9]+([,-][0-9]+)*$ ]] || die "--worker takes all, N, N-M or N,M,... (got '$WORKER')"
[[ -n ${EXTRA_ARGS[*]+x} ]] || die "give the command after --, e.g. $PROG ... -- 'nproc'"

run gcloud compute tpus tpu-vm ssh "$NODE_ID" "${WHERE[@]}" "--worker=$WORKER" "--command=${EXTRA_ARGS[*]}"
