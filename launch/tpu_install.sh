#!/usr/bin/env bash
# Put the code at one git ref on every worker of a TPU slice and install it in a virtualenv.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --project PROJECT [--ref REF | --repo URL [--ref REF] | --tarball FILE]
           [--bucket BUCKET [--mount DIR]] [--setup COMMAND]

On every worker at once (gcloud compute tpus tpu-vm ssh --worker=all): puts this repository in
~/$REMOTE_DIR, makes a Python $PYTHON_VERSION virtualenv ~/$VENV_DIR and runs pip install -e '.[tpu]';
with --bucket, mounts that Cloud Storage bucket at the same path on every worker; then runs --setup.
Run it again after a change; it replaces the code and reinstalls into the same virtualenv (a bucket
already mounted stays as it is).

Where the code comes from (one of):
  --ref REF          this checkout's commit REF, packed with git archive and copied with
                     gcloud compute tpus tpu-vm scp --worker=all (default: HEAD; uncommitted
                     changes are not included)
  --repo URL         git clone URL on each worker, then check out --ref (default: the remote's HEAD)
  --tarball FILE     a .tar.gz of the repository's files, copied to each worker

  --name NAME        the queued resource's name (required)
  --node-id ID       the TPU node's name (default: NAME)
  --zone ZONE        (default: \$CLOUDSDK_COMPUTE_ZONE)
  --project PROJECT  (default: \$CLOUDSDK_CORE_PROJECT)
  --bucket BUCKET    mount gs://BUCKET on every worker with Cloud Storage FUSE, for the run's
                     --workdir (tpu_train.sh refuses gs:// URLs: the training loop writes through
                     the file system) and for data and weights. Installs gcsfuse (>= $GCSFUSE_MIN_VERSION)
                     from Google's apt repository where it is missing or older, then, unless DIR is
                     already a mount point, runs as the ssh user:
                       gcsfuse $GCSFUSE_FLAGS BUCKET DIR
                     (the profile Google recommends for writing checkpoints). The workers' service
                     account needs roles/storage.objectUser on the bucket. The mount does not
                     survive a reboot; run this again (tpu_resume.sh does, on a new slice).
  --mount DIR        where to mount it, the same on every worker (default /mnt/BUCKET)
  --setup COMMAND    then run COMMAND on every worker, in its home directory: e.g. copy data to the
                     local disk, which reads faster than the mount:
                     --setup 'mkdir -p /tmp/unitoken && gcloud storage cp -r gs://b/data /tmp/unitoken/'
  --python-version V Python for the virtualenv (default $PYTHON_VERSION; jax needs >= 3.11, which
                     the TPU images' Python 3.10 is not, so uv fetches one)
  --remote-dir DIR   where the code goes on each worker, relative to home (default $REMOTE_DIR)
  --venv DIR         the virtualenv on each worker, relative to home (default $VENV_DIR)
  --dry-run          print the commands, run nothing
  -h, --help         this text

Example (the run's workdir is then e.g. /mnt/my-bucket/unitoken/stage2):
  $PROG --name unitoken-v5p --zone us-east5-a --project my-project --ref \$(git rev-parse HEAD) --bucket my-bucket
EOF
}

parse_args "tpu install" "$@"
check_tpu_options
require_remote_path "$REMOTE_DIR" --remote-dir
require_remote_path "$VENV_DIR" --venv
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die "--python-version looks like 3.11 (got '$PYTHON_VERSION')"
[[ -z $TARBALL || (-z $REPO_URL && -z $GIT_REF) ]] || die "--tarball comes alone, without --repo or --ref"
check_bucket_options

code=$(remote_path "$REMOTE_DIR")
venv=$(remote_path "$VENV_DIR")
ssh_all=(gcloud compute tpus tpu-vm ssh "$NODE_ID" "${WHERE[@]}" --worker=all)

# 1. the code
done_code=":"
if [[ -n $REPO_URL ]]; then
  ref=${GIT_REF:-HEAD}
  # a directory without .git (an earlier --ref or --tarball install) would make `git clone` refuse
  get_code="if [ ! -d $code/.git ]; then rm -rf $code && git clone --quiet $(shell_quote "$REPO_URL") $code; fi"
  get_code="$get_code && git -C $code fetch --quiet origin $(shell_quote "$ref")"
  get_code="$get_code && git -C $code checkout --quiet --detach FETCH_HEAD"
else
  if [[ -z $TARBALL ]]; then
    ref=${GIT_REF:-HEAD}
    # a directory of this install's own: two installs at once (two slices, two watchers) wrote one
    # archive path, each copying what the other had packed
    if ((DRY_RUN)); then
      TARBALL="${TMPDIR:-/tmp}/unitoken-jax-src.XXXXXX/src.tar.gz"
    else
      pack_dir=$(mktemp -d "${TMPDIR:-/tmp}/unitoken-jax-src.XXXXXX")
      trap 'rm -rf "$pack_dir"' EXIT
      TARBALL="$pack_dir/src.tar.gz"
    fi
    if ((!DRY_RUN)) && [[ $ref == HEAD && -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
      note "warning: $REPO_ROOT has uncommitted changes; only the committed HEAD is copied"
    fi
    run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$TARBALL" "$ref"
  elif ((!DRY_RUN)) && [[ ! -f $TARBALL ]]; then
    die "--tarball $TARBALL: no such file"
  fi
  run_retrying 3 30 gcloud compute tpus tpu-vm scp "$TARBALL" "$NODE_ID:unitoken-src.tar.gz" "${WHERE[@]}" --worker=all
  # the archive is removed only once everything below worked: a retry of this command extracts it again
  get_code="rm -rf $code && mkdir -p $code && tar -xzf unitoken-src.tar.gz -C $code"
  done_code="rm -f \$HOME/unitoken-src.tar.gz"  # (the install cd-s into the code)
fi

# 2. the virtualenv (uv brings a Python >= 3.11; pip does the install) and the package
uv="\$HOME/.local/bin/uv"
pip_user="python3 -m pip install --user --quiet"
get_uv="{ [ -x $uv ] || $pip_user uv || $pip_user --break-system-packages uv; }"
make_venv="{ [ -x $venv/bin/python ] || $uv venv --quiet --seed --python $PYTHON_VERSION $venv; }"
pip="$venv/bin/python -m pip install --quiet"
install="cd $code && $pip --upgrade pip && $pip -e '.[tpu]'"
check="$venv/bin/python -c 'import jax, unitoken_jax; print(\"installed: jax\", jax.__version__)'"

run_retrying 3 30 "${ssh_all[@]}" \
  "--command=set -e; $get_code && $get_uv && $make_venv && $install && $check && $done_code"

# 3. the bucket, mounted at the same path on every worker (the workdir lives there)
if [[ -n $BUCKET ]]; then
  run_retrying 3 30 "${ssh_all[@]}" "--command=$(mount_bucket_command "$BUCKET" "$MOUNT_DIR")"
  ((DRY_RUN)) || note "gs://$BUCKET is mounted at $MOUNT_DIR on every worker; give tpu_train.sh" \
    "a workdir there, e.g. --workdir $MOUNT_DIR/unitoken/stage2"
fi

# 4. whatever else every worker needs (data, weights), also after tpu_resume.sh brought a new slice
[[ -z $SETUP_CMD ]] || run "${ssh_all[@]}" "--command=$SETUP_CMD"
