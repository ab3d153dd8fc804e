#!/usr/bin/env bash
# Bring a preempted or failed TPU slice back and restart its run, once or watching.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG [--watch SECONDS] TPU, CREATE, INSTALL AND TRAIN OPTIONS

Looks at the queued resource's state (gcloud compute tpus queued-resources describe NAME
--format='value(state.state)'). A Spot slice that was preempted ends SUSPENDED and can never come
back, a request that failed ends FAILED: then this deletes the queued resource, creates it again
(tpu_create.sh, waiting until ACTIVE), reinstalls the code and mounts the bucket again on the new
workers (tpu_install.sh --bucket) and starts the same run again (tpu_train.sh), which resumes from
the latest checkpoint in --workdir. ACTIVE or still queued/provisioning: nothing to do.
SUSPENDING/DELETING: waits until that is over, then recovers.

Under --watch, a slice this watch has seen that is then DELETING or gone was deleted on purpose
(a preempted Spot slice ends SUSPENDED, never absent): the watch ends there and creates nothing.
A recovery that stopped after its slice came up (an install or the run's start failed) is taken
up again at the next check: the slice is ACTIVE, but its run is still owed.

--bucket is required: the new slice has fresh disks, so the bucket holding --workdir must be
mounted again, and --workdir must lie under its mount (default /mnt/BUCKET). (With no bucket,
give --setup a command that mounts the shared file system holding --workdir.)

  --watch SECONDS   check every SECONDS seconds until interrupted (default: check once)

Give --ref a commit, not a branch: each recovery installs --ref as it then is, so a branch that
moved on would bring other code to the recreated slice than the run started with.

Give it the flags you gave tpu_create.sh, tpu_install.sh and tpu_train.sh, all together; each is
passed on to the script it belongs to:
  tpu:      --name --node-id --zone --project
  create:   --accelerator-type --runtime-version --spot --reserved --create-flag --poll-seconds
  install:  --ref --repo --tarball --bucket --mount --setup --python-version --remote-dir --venv
  train:    --config --workdir --config.KEY=VALUE --env --log-dir

  --dry-run         print what a recovery runs (delete, create, install, train), run nothing
  -h, --help        this text

Example (checks every 10 minutes):
  $PROG --watch 600 --name unitoken-v5p --zone us-east5-a --project my-project \\
      --accelerator-type v5p-64 --spot --ref "\$(git rev-parse HEAD)" --bucket my-bucket \\
      --config configs/stage2.py --workdir /mnt/my-bucket/unitoken/stage2 \\
      --config.data.sources=/mnt/my-bucket/data/stage2.yaml
EOF
}

parse_args "tpu create install train watch" "$@"
check_tpu_options
require_int "$WATCH_SECONDS" --watch
# fail now, not after the slice has been deleted
require "$ACCELERATOR_TYPE" --accelerator-type "what to create again, e.g. v5p-64"
check_accelerator_type
check_train_options
check_tpu_workdir
check_bucket_options
if [[ -n $BUCKET ]]; then
  [[ $WORKDIR == "$MOUNT_DIR"/* ]] || die "--workdir $WORKDIR is not under $MOUNT_DIR, where --bucket $BUCKET" \
    "is mounted: the new slice would not find the checkpoints there (e.g. --workdir $MOUNT_DIR/unitoken/stage2)"
elif [[ -z $SETUP_CMD ]]; then
  die "--bucket is required: the new slice must mount the bucket that holds --workdir again" \
    "(e.g. --bucket my-bucket --workdir /mnt/my-bucket/unitoken/stage2), or give --setup a command that mounts it"
fi

dry=()
((!DRY_RUN)) || dry=(--dry-run)

SEEN=0          # this watch has seen the slice (gone after that: deleted on purpose)
RESTART_OWED=0  # a recovery's slice came up, but its install or the run's start failed

# Each step stops the recovery when it fails (under --watch this runs where `set -e` does not act).
recover() {  # recover STATE
  note "$NAME is $1: deleting it, creating it again, reinstalling," \
    "${BUCKET:+mounting gs://$BUCKET again, }restarting the run (it resumes from the latest checkpoint in $WORKDIR)"
  if [[ $1 != ABSENT ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet || return 1
  fi
  "$LAUNCH_DIR/tpu_create.sh" "${FORWARD_TPU[@]}" ${FORWARD_CREATE[@]+"${FORWARD_CREATE[@]}"} \
    ${dry[@]+"${dry[@]}"} || return 1
  SEEN=1
  RESTART_OWED=1
  restart
}

restart() {  # the install (and the bucket's mount) and the run's start on the slice that is up
  "$LAUNCH_DIR/tpu_install.sh" "${FORWARD_TPU[@]}" ${FORWARD_INSTALL[@]+"${FORWARD_INSTALL[@]}"} \
    ${dry[@]+"${dry[@]}"} || return 1
  "$LAUNCH_DIR/tpu_train.sh" "${FORWARD_TPU[@]}" "${FORWARD_TRAIN[@]}" ${dry[@]+"${dry[@]}"} || return 1
  RESTART_OWED=0
  note "$NAME is back and the run restarted; follow it with launch/tpu_logs.sh"
}

check_once() {
  local state
  state=$(qr_state) || { note "could not read the state of $NAME"; return 1; }
  if ((WATCH_SECONDS && SEEN)) && [[ $state == DELETING || $state == ABSENT ]]; then
    note "$NAME is $state: it was deleted, not preempted (a preempted Spot slice ends SUSPENDED), so the" \
      "watch ends here and creates nothing; launch/tpu_resume.sh without --watch creates it again"
    exit 0
  fi
  while [[ $state == SUSPENDING || $state == DELETING ]]; do
    note "$NAME is $state; waiting until that is over"
    sleep "$POLL_SECONDS"
    state=$(qr_state) || { note "could not read the state of $NAME"; return 1; }
  done
  [[ $state == ABSENT ]] || SEEN=1
  case $state in
    ACTIVE)
      if ((RESTART_OWED)); then
        note "$NAME is ACTIVE, but the last recovery stopped before the run restarted: reinstalling and restarting it"
        restart
      else
        note "$NAME is ACTIVE; nothing to do"
      fi ;;
    WAITING_FOR_RESOURCES | ACCEPTED | CREATING | PROVISIONING) note "$NAME is $state (on its way up); nothing to do" ;;
    SUSPENDED | FAILED | ABSENT) recover "$state" ;;
    *) note "$NAME is in a state this script does not know: $state"; return 1 ;;
  esac
}

if ((DRY_RUN)); then
  describe_command
  run "${DESCRIBE_CMD[@]}"
  note "dry run: what happens when the state is SUSPENDED or FAILED:"
  recover SUSPENDED
  exit 0
fi

if ((WATCH_SECONDS == 0)); then
  check_once
  exit
fi
note "checking $NAME every ${WATCH_SECONDS}s; Ctrl-C stops watching (never the run)"
while true; do
  check_once || note "this check failed; trying again in ${WATCH_SECONDS}s"
  sleep "$WATCH_SECONDS"
done
