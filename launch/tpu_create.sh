#!/usr/bin/env bash
# Create a TPU VM slice as a queued resource and wait until it is ACTIVE.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --project PROJECT --accelerator-type TYPE [options]

Requests a TPU VM slice as a queued resource (gcloud compute tpus queued-resources create) and
waits until it is ACTIVE, printing each state it passes through.

  --name NAME              the queued resource's name (required)
  --node-id ID             the TPU node's name, used by ssh (default: NAME)
  --zone ZONE              e.g. us-east5-a (default: \$CLOUDSDK_COMPUTE_ZONE)
  --project PROJECT        Google Cloud project id (default: \$CLOUDSDK_CORE_PROJECT)
  --accelerator-type TYPE  e.g. v5p-64 (v5p and v4 count TensorCores, two a chip: v5p-64 = 32
                           chips on 8 workers, topology 2x4x4; v5p-128 = 64 chips, 4x4x4;
                           v5litepod and v6e count chips)
  --runtime-version V      TPU software version (default by generation: v5p v2-alpha-tpuv5,
                           v5litepod v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e, v4 tpu-ubuntu2204-base)
  --spot                   Spot capacity: cheaper, can be preempted (see tpu_resume.sh)
  --reserved               your reservation's capacity
  --create-flag FLAG       one more flag for the create command, repeatable, e.g.
                           --create-flag=--internal-ips  --create-flag=--network=my-net
  --no-wait                return once the request is queued
  --poll-seconds S         seconds between state checks (default 30)
  --dry-run                print the commands (create, then the describe used to poll), run nothing
  -h, --help               this text

Example:
  $PROG --name unitoken-v5p --zone us-east5-a --project my-project --accelerator-type v5p-64 --spot
EOF
}

parse_args "tpu create" "$@"
check_tpu_options
require "$ACCELERATOR_TYPE" --accelerator-type "e.g. --accelerator-type v5p-64"
check_accelerator_type
require_int "$POLL_SECONDS" --poll-seconds

create=(gcloud compute tpus queued-resources create "$NAME" "--node-id=$NODE_ID" "${WHERE[@]}"
  "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION")
[[ -z $PROVISIONING ]] || create+=("$PROVISIONING")
create+=(${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"})
run "${create[@]}"

if ((WAIT)); then
  wait_until_active
  ((DRY_RUN)) || note "$NAME is ACTIVE: TPU VM slice '$NODE_ID' in $ZONE"
fi
