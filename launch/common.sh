# shellcheck shell=bash disable=SC2034  # SC2034: the variables set here are read by the scripts
# Shared by the launch/ scripts: one option table, --dry-run printing, checks. Sourced, never run.
#
# Every option any launch script takes is parsed here, so a flag means the same everywhere and
# tpu_resume.sh can hand each script exactly the flags it was given. A script names the option
# groups it accepts; any other option is an error. Written for bash >= 3.2 (macOS's /bin/bash):
# possibly-empty arrays are expanded as ${a[@]+"${a[@]}"}.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
PROG=$(basename "$0")

DRY_RUN=0
# the TPU slice: a queued resource NAME whose one node is NODE_ID (the TPU VM slice itself)
NAME="" NODE_ID="" ZONE="${CLOUDSDK_COMPUTE_ZONE:-}" PROJECT="${CLOUDSDK_CORE_PROJECT:-}"
# creating it
ACCELERATOR_TYPE="" RUNTIME_VERSION="" PROVISIONING="" WAIT=1 POLL_SECONDS=30 CREATE_FLAGS=()
# installing the code on every worker (paths relative to the worker's home directory)
REPO_URL="" GIT_REF="" TARBALL="" PYTHON_VERSION=3.11 SETUP_CMD=""
REMOTE_DIR=unitoken-jax VENV_DIR=unitoken-venv LOG_DIR=unitoken-logs
# a Cloud Storage bucket mounted on every worker with Cloud Storage FUSE (default: at /mnt/BUCKET).
# --profile=aiml-checkpointing is Google's recommended mount for writing checkpoints (gcsfuse >=
# 3.4.0): implicit directories, metadata cached for the mount's life, directory renames allowed
# (Orbax finalizes a checkpoint by renaming its temporary directory).
BUCKET="" MOUNT_DIR=""
GCSFUSE_MIN_VERSION=3.4.0
GCSFUSE_FLAGS="--implicit-dirs --profile=aiml-checkpointing"
# the training run
CONFIG="" WORKDIR="" OVERRIDES=() ENV_VARS=() STOP=0
# following logs
WORKER=0 TAIL_LINES=100 FOLLOW=1
# one GPU host
GPUS="" PORT=8476 SINGLE_PROCESS=0 PYTHON=python
# watching a slice
WATCH_SECONDS=0
# after `--`
EXTRA_ARGS=()
# filled by check_tpu_options / make_train_command
WHERE=() TRAIN_CMD=() DESCRIBE_CMD=()
# the flags given, by group, so tpu_resume.sh can pass them on unchanged
FORWARD_TPU=() FORWARD_CREATE=() FORWARD_INSTALL=() FORWARD_TRAIN=()

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for the options." >&2
  exit 2
}

note() { echo "$PROG: $*" >&2; }

# --- printing and running commands ----------------------------------------------------------
# One word, quoted for a POSIX shell only where needed; `shlex.split` in Python reads it back.
shell_quote() {
  local s=$1 sq="'" rep="'\\''"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//$sq/$rep}"
  fi
}

quote_cmd() {
  local w out=""
  for w in "$@"; do out="$out${out:+ }$(shell_quote "$w")"; done
  printf '%s' "$out"
}

# With --dry-run: print the command on stdout, one line. Otherwise: show it on stderr, run it.
run() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
    echo
    return 0
  fi
  echo "+ $(quote_cmd "$@")" >&2
  "$@"
}

# run, retried (e.g. ssh to VMs that have just booted); dry-run prints the command once
run_retrying() {
  local attempts=$1 pause=$2 i
  shift 2
  if ((DRY_RUN)); then run "$@"; return 0; fi
  for ((i = 1; i <= attempts; i++)); do
    if run "$@"; then return 0; fi
    if ((i < attempts)); then note "attempt $i of $attempts failed; trying again in ${pause}s"; sleep "$pause"; fi
  done
  return 1
}

# --- options ------------------------------------------------------------------------------
_GROUPS=""
_TAKEN=0
_VALUE=""

# _value OPT INLINE_FLAG INLINE_VALUE "$@": the option's value (--opt=v or --opt v) into _VALUE
_value() {
  local opt=$1 has_inline=$2 inline=$3
  shift 3
  if ((has_inline)); then
    _VALUE=$inline
    _TAKEN=1
  elif (($# < 2)) || [[ $2 == --* ]]; then
    die "$opt needs a value (write $opt=VALUE if the value itself starts with --)"
  else
    _VALUE=$2
    _TAKEN=2
  fi
  [[ -n $_VALUE ]] || die "$opt needs a non-empty value"
}

_allow() {  # _allow GROUP OPT: dies unless this script takes GROUP's options
  [[ " $_GROUPS " == *" $1 "* ]] || die "unknown option $2 (this script takes: $(_groups_text))"
}

_groups_text() {
  local g out=""
  for g in $_GROUPS; do
    case $g in
      tpu) out="$out --name --node-id --zone --project" ;;
      create) out="$out --accelerator-type --runtime-version --spot --reserved --no-wait --poll-seconds --create-flag" ;;
      install) out="$out --repo --ref --tarball --python-version --setup --bucket --mount --remote-dir --venv" ;;
      train) out="$out --config --workdir --config.KEY=VALUE --env --remote-dir --venv --log-dir" ;;
      stop) out="$out --stop" ;;
      logs) out="$out --worker --lines --no-follow --log-dir" ;;
      ssh) out="$out --worker -- COMMAND" ;;
      gpu) out="$out --gpus --port --single-process --python --log-dir" ;;
      slurm) out="$out --python" ;;
      watch) out="$out --watch" ;;
    esac
  done
  echo "--help --dry-run$out"
}

# parse_args "GROUP ..." "$@": fills the variables above; needs a `usage` function in the script
parse_args() {
  _GROUPS=$1
  shift
  local opt has_inline inline
  while (($#)); do
    opt=$1 has_inline=0 inline="" _TAKEN=1
    if [[ $opt == --* && $opt == *=* && $opt != --config.* ]]; then
      has_inline=1 inline=${opt#*=} opt=${opt%%=*}
    fi
    case $opt in  # an on/off flag given a value (--stop=no) was read as the flag itself
      -h | --help | --dry-run | --spot | --reserved | --no-wait | --stop | --no-follow | --single-process)
        ((!has_inline)) || die "$opt takes no value (got '$opt=$inline')" ;;
    esac
    case $opt in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --)
        shift
        _allow ssh "--"
        EXTRA_ARGS=("$@")
        return 0
        ;;
      --name | --node-id | --zone | --project)
        _allow tpu "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        case $opt in
          --name) NAME=$_VALUE ;;
          --node-id) NODE_ID=$_VALUE ;;
          --zone) ZONE=$_VALUE ;;
          --project) PROJECT=$_VALUE ;;
        esac
        FORWARD_TPU+=("$opt=$_VALUE")
        ;;
      --accelerator-type | --runtime-version | --poll-seconds | --create-flag)
        _allow create "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        case $opt in
          --accelerator-type) ACCELERATOR_TYPE=$_VALUE ;;
          --runtime-version) RUNTIME_VERSION=$_VALUE ;;
          --poll-seconds) POLL_SECONDS=$_VALUE ;;
          --create-flag) CREATE_FLAGS+=("$_VALUE") ;;
        esac
        FORWARD_CREATE+=("$opt=$_VALUE")
        ;;
      --spot | --reserved)
        _allow create "$opt"
        ((!has_inline)) || die "$opt takes no value"
        [[ -z $PROVISIONING || $PROVISIONING == "$opt" ]] || die "give --spot or --reserved, not both"
        PROVISIONING=$opt
        FORWARD_CREATE+=("$opt")
        ;;
      --no-wait)
        _allow create "$opt"
        WAIT=0
        ;;
      --repo | --ref | --tarball | --python-version | --setup | --bucket | --mount)
        _allow install "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        case $opt in
          --repo) REPO_URL=$_VALUE ;;
          --ref) GIT_REF=$_VALUE ;;
          --tarball) TARBALL=$_VALUE ;;
          --python-version) PYTHON_VERSION=$_VALUE ;;
          --setup) SETUP_CMD=$_VALUE ;;
          --bucket) BUCKET=$_VALUE ;;
          --mount) MOUNT_DIR=$_VALUE ;;
        esac
        FORWARD_INSTALL+=("$opt=$_VALUE")
        ;;
      --remote-dir | --venv)
        [[ " $_GROUPS " == *" install "* ]] || _allow train "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        case $opt in
          --remote-dir) REMOTE_DIR=$_VALUE ;;
          --venv) VENV_DIR=$_VALUE ;;
        esac
        FORWARD_INSTALL+=("$opt=$_VALUE")
        FORWARD_TRAIN+=("$opt=$_VALUE")
        ;;
      --config | --workdir | --env)
        _allow train "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        case $opt in
          --config) CONFIG=$_VALUE ;;
          --workdir) WORKDIR=$_VALUE ;;
          --env)
            [[ $_VALUE =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env takes NAME=VALUE (got '$_VALUE')"
            ENV_VARS+=("$_VALUE")
            ;;
        esac
        FORWARD_TRAIN+=("$opt=$_VALUE")
        ;;
      --config.*)
        _allow train "$opt"
        [[ $opt == --config.?*=* ]] || die "write config overrides as --config.KEY=VALUE (got '$opt')"
        OVERRIDES+=("$opt")
        FORWARD_TRAIN+=("$opt")
        ;;
      --log-dir)
        [[ " $_GROUPS " == *" logs "* || " $_GROUPS " == *" gpu "* ]] || _allow train "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        LOG_DIR=$_VALUE
        FORWARD_TRAIN+=("$opt=$_VALUE")
        ;;
      --stop)
        _allow stop "$opt"
        STOP=1
        ;;
      --worker)
        [[ " $_GROUPS " == *" ssh "* ]] || _allow logs "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        WORKER=$_VALUE
        ;;
      --lines)
        _allow logs "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        TAIL_LINES=$_VALUE
        ;;
      --no-follow)
        _allow logs "$opt"
        FOLLOW=0
        ;;
      --gpus | --port)
        _allow gpu "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        case $opt in
          --gpus) GPUS=$_VALUE ;;
          --port) PORT=$_VALUE ;;
        esac
        ;;
      --single-process)
        _allow gpu "$opt"
        SINGLE_PROCESS=1
        ;;
      --python)
        [[ " $_GROUPS " == *" slurm "* ]] || _allow gpu "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        PYTHON=$_VALUE
        ;;
      --watch)
        _allow watch "$opt"
        _value "$opt" "$has_inline" "$inline" "$@"
        WATCH_SECONDS=$_VALUE
        ;;
      -*) die "unknown option $1 (this script takes: $(_groups_text))" ;;
      *) die "unexpected argument '$1' (options start with --; config overrides are --config.KEY=VALUE)" ;;
    esac
    shift "$_TAKEN"
  done
}

# --- checks -------------------------------------------------------------------------------
require() {  # require VALUE FLAG WHAT
  [[ -n $1 ]] || die "$2 is required ($3)"
}

require_int() {  # require_int VALUE FLAG
  [[ $1 =~ ^[0-9]+$ ]] || die "$2 takes a whole number (got '$1')"
}

# A path on the workers: relative to the home directory (or absolute), plain characters only,
# so it can go into a remote shell command unquoted.
require_remote_path() {  # require_remote_path VALUE FLAG
  [[ $1 =~ ^[A-Za-z0-9_./-]+$ ]] || die "$2 must be a plain path (letters, digits, _ . / -), got '$1'"
}

check_tpu_options() {
  require "$NAME" --name "the queued resource's name, e.g. --name unitoken-v5p"
  require "$ZONE" --zone "e.g. --zone us-east5-a, or set CLOUDSDK_COMPUTE_ZONE"
  require "$PROJECT" --project "your Google Cloud project id, or set CLOUDSDK_CORE_PROJECT"
  [[ -n $NODE_ID ]] || NODE_ID=$NAME
  WHERE=("--project=$PROJECT" "--zone=$ZONE")  # the flags every `gcloud compute tpus` call needs
}

# --bucket B [--mount DIR]: B may be written gs://B; DIR defaults to /mnt/B
check_bucket_options() {
  if [[ -z $BUCKET ]]; then
    [[ -z $MOUNT_DIR ]] || die "--mount says where to mount --bucket; give --bucket too"
    return 0
  fi
  BUCKET=${BUCKET#gs://}
  BUCKET=${BUCKET%/}
  [[ $BUCKET =~ ^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$ ]] ||
    die "--bucket takes a bucket's name, 3 or more lowercase letters, digits, - _ or ., e.g. my-bucket" \
      "or gs://my-bucket; not a path in it (got '$BUCKET')"
  [[ -n $MOUNT_DIR ]] || MOUNT_DIR=/mnt/$BUCKET
  MOUNT_DIR=${MOUNT_DIR%/}
  [[ $MOUNT_DIR == /?* ]] || die "--mount must be an absolute path, e.g. /mnt/$BUCKET (got '$MOUNT_DIR')"
  require_remote_path "$MOUNT_DIR" --mount
}

# What to say about a URL workdir: the training loop writes through the file system.
_url_workdir_advice() {
  local bucket="" rest=""
  if [[ $WORKDIR == gs://* ]]; then
    bucket=${WORKDIR#gs://}
    bucket=${bucket%%/*}
    rest=${WORKDIR#gs://"$bucket"}
  fi
  if [[ " $_GROUPS " == *" tpu "* ]]; then
    local where=/mnt/${bucket:-my-bucket}
    echo "mount the bucket on every worker with Cloud Storage FUSE (launch/tpu_install.sh" \
      "--bucket ${bucket:-my-bucket} mounts it at $where) and pass the mounted path, e.g." \
      "--workdir $where${rest:-/unitoken/stage2}"
  else
    echo "give a directory that every process sees and that outlives the run: a shared file" \
      "system, or the bucket mounted with Cloud Storage FUSE on every node" \
      "(gcsfuse ${bucket:-my-bucket} /mnt/${bucket:-my-bucket}), e.g. --workdir /mnt/${bucket:-my-bucket}${rest:-/unitoken/stage2}"
  fi
}

check_train_options() {
  require "$CONFIG" --config "a stage config, e.g. --config configs/stage2.py"
  require "$WORKDIR" --workdir "where checkpoints go, shared by every host and kept after the run"
  if [[ $WORKDIR =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]]; then
    die "--workdir $WORKDIR is a URL, but the training loop writes checkpoints, TensorBoard" \
      "events and the final model through the file system: $(_url_workdir_advice)"
  fi
}

# On a TPU slice the workdir is a path on the workers, in a file system they all share.
check_tpu_workdir() {
  [[ $WORKDIR == /* ]] || die "--workdir must be an absolute path that every worker shares, in the bucket" \
    "mounted by launch/tpu_install.sh --bucket my-bucket, e.g. /mnt/my-bucket/unitoken/stage2 (got '$WORKDIR')"
  # `unitoken sweep` names its runs' workdirs learning_rate=0.001,seed=0 (+ between a tuple's values)
  [[ $WORKDIR =~ ^[A-Za-z0-9_./=,+-]+$ ]] ||
    die "--workdir must be a plain path (letters, digits, _ . / - and the = , + of sweep run names), got '$WORKDIR'"
}

# TRAIN_CMD=(PYTHON -m unitoken_jax.train --config C --workdir W FLAG... --config.KEY=VALUE...)
make_train_command() {  # make_train_command PYTHON [FLAG ...]: FLAGs are the distributed ones
  local python=$1
  shift
  TRAIN_CMD=("$python" -m unitoken_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
    ${OVERRIDES[@]+"${OVERRIDES[@]}"})
}

# --- queued resources ---------------------------------------------------------------------
# The accelerator type's form, and a TPU software version for it (given, or the known default):
# tpu_resume.sh checks them before it deletes a slice, not at the create after it.
check_accelerator_type() {
  [[ $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    die "--accelerator-type looks like v5p-64, v5litepod-16, v6e-16 or v4-32 (got '$ACCELERATOR_TYPE')"
  if [[ -z $RUNTIME_VERSION ]]; then
    RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
      die "no default TPU software version for $ACCELERATOR_TYPE; give --runtime-version"
  fi
}

# The TPU software version Google documents for JAX on each TPU generation.
default_runtime_version() {  # default_runtime_version ACCELERATOR_TYPE
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

describe_command() {  # DESCRIBE_CMD: prints the queued resource's state, e.g. ACTIVE
  DESCRIBE_CMD=(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" "--format=value(state.state)")
}

# The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...), or ABSENT when
# there is none of that name; fails (with gcloud's message) on any other error.
qr_state() {
  local out err rc=0
  describe_command
  err=$(mktemp)
  out=$("${DESCRIBE_CMD[@]}" 2>"$err") || rc=$?
  if ((rc != 0)); then
    if grep -q "NOT_FOUND" "$err"; then
      out=ABSENT
    else
      cat "$err" >&2
      rm -f "$err"
      return 1
    fi
  fi
  rm -f "$err"
  out=$(echo "$out" | tr -d '[:space:]')
  echo "${out:-UNKNOWN}"
}

# Polls until the queued resource is ACTIVE; fails if it reaches a state it cannot leave.
wait_until_active() {
  describe_command
  if ((DRY_RUN)); then
    run "${DESCRIBE_CMD[@]}"
    return 0
  fi
  note "waiting for $NAME to become ACTIVE, polling every ${POLL_SECONDS}s with: $(quote_cmd "${DESCRIBE_CMD[@]}")"
  local state last="" errors=0
  while true; do
    if ! state=$(qr_state); then
      errors=$((errors + 1))
      ((errors < 5)) || { note "describe failed $errors times in a row; giving up"; return 1; }
      sleep "$POLL_SECONDS"
      continue
    fi
    errors=0
    [[ $state == "$last" ]] || note "$NAME: $state"
    last=$state
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING | ABSENT)
        note "$NAME is $state and will not become ACTIVE; for the reason, see:" \
          "$(quote_cmd gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}")"
        return 1
        ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

# Where things live on a worker: a path relative to the home directory becomes "$HOME/path"
# (expanded by the worker's shell), an absolute one stays as it is.
remote_path() {
  case $1 in
    /*) printf '%s' "$1" ;;
    *) printf '%s' "\$HOME/$1" ;;
  esac
}

# The shell command (POSIX sh, for a worker's login shell) that makes sure gcsfuse >= GCSFUSE_MIN_VERSION
# is installed, from Google's apt repository as Cloud Storage FUSE's install guide does it, and
# mounts gs://BUCKET at DIR as the ssh user unless DIR is already a mount point.
mount_bucket_command() {  # mount_bucket_command BUCKET DIR
  local bucket=$1 dir=$2 key=/usr/share/keyrings/cloud.google.asc
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q"
  local who="\$(hostname)"
  local version="v=\$(gcsfuse --version 2>/dev/null | awk 'NR == 1 {print \$3}' || true)"
  local recent="[ -n \"\$v\" ] && printf '%s\\n' $GCSFUSE_MIN_VERSION \"\$v\" | sort -V -C"
  local install="echo \"$who: installing gcsfuse (found: \${v:-none}; need >= $GCSFUSE_MIN_VERSION)\""
  install="$install; sudo curl -fsSL -o $key https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  install="$install; echo \"deb [signed-by=$key] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\""
  install="$install | sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null"
  install="$install; $apt update; $apt install -y gcsfuse"
  local mount="if grep -qs ' $dir fuse' /proc/mounts; then sudo umount -l $dir; fi"  # a dead mount
  mount="$mount; sudo mkdir -p $dir; sudo chown \"\$(id -u):\$(id -g)\" $dir"
  mount="$mount; gcsfuse $GCSFUSE_FLAGS $bucket $dir"
  mount="$mount; echo \"$who: mounted gs://$bucket at $dir\""
  printf '%s' "set -e; $version; if $recent; then :; else $install; fi"
  printf '%s' "; if mountpoint -q $dir; then echo \"$who: $dir is already mounted\"; else $mount; fi"
}
