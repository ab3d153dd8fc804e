"""Sweeps (unitoken_jax/sweep.py, `unitoken sweep`): a config file's sweep(add) expands into runs
with their own workdirs and records; the printed launch commands are exact; statuses and metrics
are read back from workdirs; end to end, a 2x2 grid on the tiny stage-2 config trains here, is
summarised, and is skipped when the sweep runs again."""

import contextlib
import io
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import CHEAP_COMPILES
from unitoken_jax import cli
from unitoken_jax import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_CONFIG = '''
from unitoken_jax import configs


def get_config(arg="small"):
    c = configs.get_config("stage2.py:tiny")  # one the train command takes: `unitoken sweep` checks each run's
    c.model_name = arg
    c.optimizer.learning_rate = 0.1
    c.total_steps = 10
    return c
'''


def _write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def _grid_file(tmp_path, extra=""):
    return _write(tmp_path, "grid.py", SMALL_CONFIG + '''

def sweep(add):
    for lr in (0.1, 0.01):
        for seed in (0, 1):
            add(**{"optimizer.learning_rate": lr, "data.seed": seed})
''' + extra)


def test_a_runs_config_json_is_the_loops_record_and_a_real_change_is_named_when_it_resumes(tmp_path, caplog):
    """The sweep wrote config.json in another form than the training loop records (4 keys fewer),
    so every start of a run warned of a change that was none and kept a config.previousN.json; and
    it rewrote a started run's config.json with the edited config, so the loop named no real change
    when the run resumed from checkpoints trained with the old one."""
    import logging

    from unitoken_jax.train.config import TrainConfig
    from unitoken_jax.train.loop import record_config

    root = str(tmp_path / "root")
    path = _grid_file(tmp_path)
    sweep = sweep_lib.expand(path, root, check=TrainConfig.from_config_dict)
    sweep_lib.write_records(sweep)
    run = sweep.runs[0]
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.train.loop"):
        record_config(run.workdir, TrainConfig.from_config_dict(run.config).to_dict())  # the run starts
    assert "differs" not in caplog.text and not os.path.exists(os.path.join(run.workdir, "config.previous1.json"))
    os.makedirs(os.path.join(run.workdir, "checkpoints", "5"))  # it trained, and stopped
    with open(path) as f:
        edited = f.read().replace("c.total_steps = 10", "c.total_steps = 10\n    c.data.rows = 4")
    with open(path, "w") as f:
        f.write(edited)
    sweep = sweep_lib.expand(path, root, check=TrainConfig.from_config_dict)
    sweep_lib.write_records(sweep)
    assert json.load(open(os.path.join(sweep.runs[1].workdir, "config.json")))["data"]["rows"] == 4  # not started
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.train.loop"):
        record_config(run.workdir, TrainConfig.from_config_dict(sweep.runs[0].config).to_dict())  # it resumes
    assert "data.rows: 8 -> 4" in caplog.text
    assert json.load(open(os.path.join(run.workdir, "config.previous1.json")))["data"]["rows"] == 8


def test_a_2x2_grid_expands_into_four_runs_with_their_own_workdirs_and_records(tmp_path):
    root = str(tmp_path / "root")
    sweep = sweep_lib.expand(_grid_file(tmp_path) + ":big", root)
    assert [r.overrides for r in sweep.runs] == [
        {"optimizer.learning_rate": lr, "data.seed": seed} for lr in (0.1, 0.01) for seed in (0, 1)]
    assert [r.name for r in sweep.runs] == ["learning_rate=0.1,seed=0", "learning_rate=0.1,seed=1",
                                            "learning_rate=0.01,seed=0", "learning_rate=0.01,seed=1"]
    assert [r.workdir for r in sweep.runs] == [os.path.join(root, r.name) for r in sweep.runs]
    for run, (lr, seed) in zip(sweep.runs, [(0.1, 0), (0.1, 1), (0.01, 0), (0.01, 1)]):
        assert (run.config.optimizer.learning_rate, run.config.data.seed) == (lr, seed)
        assert run.config.model_name == "big"  # get_config got the argument after the colon
        assert run.config.optimizer.b1 == 0.9 and run.config.total_steps == 10  # the rest is the base config

    sweep_lib.write_records(sweep)
    for run in sweep.runs:
        with open(os.path.join(run.workdir, "overrides.json")) as f:
            assert json.load(f) == run.overrides
        with open(os.path.join(run.workdir, "config.json")) as f:
            config = json.load(f)
        assert config["optimizer"]["learning_rate"] == run.overrides["optimizer.learning_rate"]
        assert config["data"]["seed"] == run.overrides["data.seed"]
    with open(os.path.join(root, "sweep.json")) as f:
        assert [r["name"] for r in json.load(f)["runs"]] == [r.name for r in sweep.runs]
    assert {r["status"] for r in sweep_lib.summarize(root)} == {"not started"}


def test_run_names_are_short_readable_and_distinct(tmp_path):
    assert sweep_lib.run_names([{"seed": 0, "data.seed": 1, "optimizer.b1": 0.9}, {"seed": 1, "data.seed": 1}]) == [
        "seed=0,data.seed=1,b1=0.9", "seed=1,data.seed=1"]  # a leaf two keys share is spelled out
    names = sweep_lib.run_names([{"data.sources": ("a/b",)}, {"data.sources": ("a b",)}, {}])
    assert names[0].startswith("sources=a-b-") and names[1].startswith("sources=a-b-") and names[0] != names[1]
    assert names[2] == "base"
    twice = _write(tmp_path, "twice.py", SMALL_CONFIG + '''
def sweep(add):
    add(seed=1)
    add(seed=1)
''')
    with pytest.raises(sweep_lib.SweepError, match="the same run twice"):
        sweep_lib.expand(twice, str(tmp_path / "root"))


def test_the_same_config_added_twice_is_one_run_however_its_overrides_are_spelt(tmp_path):
    """Duplicates were found by run name, which depended on the order of add()'s keys and on how a
    value was written: both pairs below trained twice."""
    order = _write(tmp_path, "order.py", SMALL_CONFIG + '''
def sweep(add):
    add(**{"optimizer.learning_rate": 0.001, "data.seed": 0})
    add(**{"data.seed": 0, "optimizer.learning_rate": 0.001})
''')
    with pytest.raises(sweep_lib.SweepError, match=r"the same run twice \(0: .* and 1: "):
        sweep_lib.expand(order, str(tmp_path / "root"))
    spelling = _write(tmp_path, "spelling.py", SMALL_CONFIG + '''
def sweep(add):
    add(**{"optimizer.learning_rate": 1, "data.seed": 1})
    add(**{"optimizer.learning_rate": 1.0, "data.seed": 1})
''')
    with pytest.raises(sweep_lib.SweepError, match="the same run twice"):
        sweep_lib.expand(spelling, str(tmp_path / "root"))
    # keys in a run's name follow the order the sweep first adds them, whatever each add()'s order
    assert sweep_lib.run_names([{"a.x": 1, "b.y": 2}, {"b.y": 3, "a.x": 4}]) == ["x=1,y=2", "x=4,y=3"]


def test_a_root_holds_one_sweep_and_a_sweep_needing_its_argument_says_so(tmp_path, capsys):
    path, root = _grid_file(tmp_path), str(tmp_path / "root")
    assert cli.main(["sweep", path, "--root", root, "--set", "total_steps=7"]) == 0
    assert cli.main(["sweep", path, "--root", root, "--set", "total_steps=7"]) == 0  # the same again: fine
    capsys.readouterr()
    # other fixed overrides (other data, say) would resume from the first sweep's checkpoints
    assert cli.main(["sweep", path, "--root", root, "--set", "total_steps=8"]) == 2
    err = capsys.readouterr().err
    assert "holds a sweep of" in err and "give another --root" in err
    with pytest.raises(sweep_lib.SweepError, match="give another --root"):
        sweep_lib.main(path + ":other", root, fixed=["total_steps=7"])
    with open(os.path.join(root, "sweep.json")) as f:
        assert json.load(f)["fixed"] == ["--config.total_steps=7"]  # left as it was

    # the same file and fixed overrides, spelt otherwise: relative from another directory, the
    # flags in another order (both were refused, advising a new root: every run from scratch)
    assert cli.main(["sweep", path, "--root", root, "--set", "total_steps=7", "--set", "log_every=1"]) == 2
    capsys.readouterr()
    other = str(tmp_path / "other_root")
    assert cli.main(["sweep", path, "--root", other, "--set", "total_steps=7", "--set", "log_every=1"]) == 0
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert cli.main(["sweep", "grid.py", "--root", other, "--set", "log_every=1", "--set", "total_steps=7"]) == 0
        os.makedirs("sub", exist_ok=True)
        os.chdir("sub")
        assert cli.main(["sweep", "../grid.py", "--root", other, "--set", "log_every=1", "--set",
                         "total_steps=7"]) == 0, capsys.readouterr().err
    finally:
        os.chdir(cwd)
    capsys.readouterr()

    # sweep(add) edited so a run keeps its name with other settings (a swept key renamed): its
    # workdir's checkpoints or final results were taken for the new settings' run
    renamed = _write(tmp_path, "grid.py", SMALL_CONFIG + '''
def sweep(add):
    for lr in (0.1, 0.01):
        for seed in (0, 1):
            add(**{"optimizer.learning_rate": lr, "seed": seed})
''')
    assert renamed == path and sweep_lib.expand(path, root).runs[0].name == "learning_rate=0.1,seed=0"
    assert cli.main(["sweep", path, "--root", root, "--set", "total_steps=7"]) == 2
    err = capsys.readouterr().err
    assert "run learning_rate=0.1,seed=0 of" in err and "{'optimizer.learning_rate': 0.1, 'data.seed': 0}" in err \
        and "is now {'optimizer.learning_rate': 0.1, 'seed': 0}" in err and "give another --root" in err
    _grid_file(tmp_path)  # as it was

    needs_arg = _write(tmp_path, "needs_arg.py", SMALL_CONFIG + '''
def sweep(add, arg):
    add(**{"data.seed": len(arg)})
''')
    with pytest.raises(sweep_lib.SweepError, match=r"sweep\(add, arg\) takes the config argument.*needs_arg\.py:ARG"):
        sweep_lib.expand(needs_arg, str(tmp_path / "other"))
    assert [r.overrides for r in sweep_lib.expand(needs_arg + ":abc", str(tmp_path / "other")).runs] == [
        {"data.seed": 3}]


def test_a_printed_tpu_line_is_one_launch_tpu_train_sh_accepts(tmp_path, monkeypatch, capsys):
    """The README's TPU sweep: each printed line, run with --dry-run, is the slice's train command.
    The run names' = and , were refused as a workdir, and a packaged config name was printed as
    this machine's absolute path, which the workers do not have."""
    monkeypatch.chdir(tmp_path)  # no configs/ here: stage2.py:tiny is the packaged config
    launcher = f"bash {REPO}/launch/tpu_train.sh --name s2-{{i}} --zone Z --project P {{args}} --dry-run"
    root = str(tmp_path / "bucket" / "s2")  # (it was /mnt/bucket/s2 on the machine running the tests)
    assert cli.main(["sweep", "stage2.py:tiny", "--root", root, "--launcher", launcher]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    for line in lines:
        r = subprocess.run(line, shell=True, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
        words = shlex.split(r.stdout.splitlines()[-1])
        command = next(w for w in words if w.startswith("--command="))
        assert "-m unitoken_jax.train --config stage2.py:tiny --workdir " in command
        assert re.search(rf"--workdir {re.escape(root)}/learning_rate=[0-9.]+,seed=[01] ", command), command
    # a packaged config is the same sweep from another install of the package (a record names it so)
    with open(os.path.join(root, "sweep.json")) as f:
        assert json.load(f)["config_file"] == "stage2.py:tiny"


def test_a_run_is_not_printed_again_while_its_process_runs_here(tmp_path, capsys):
    path, root = _grid_file(tmp_path), str(tmp_path / "root")
    sweep = sweep_lib.expand(path, root)
    sweep_lib.write_records(sweep)
    busy = sweep.runs[1].workdir
    run = subprocess.Popen(["sleep", "60"])  # the run's process, started when its record says
    try:
        record = {"state": "running", "host": socket.gethostname(), "pid": run.pid, "started": time.time()}
        with open(os.path.join(busy, sweep_lib.STATUS_FILE), "w") as f:
            json.dump(record, f)
        assert cli.main(["sweep", path, "--root", root]) == 0
        out, err = capsys.readouterr()
        assert [shlex.split(line)[6] for line in out.splitlines()] == [
            r.workdir for r in sweep.runs if r.workdir != busy]
        assert "1 of 4 runs running already; not listed" in err
        # the same process number an hour after the record: another process (the host or container
        # restarted, the number reused): the run was "running" forever, never listed again
        with open(os.path.join(busy, sweep_lib.STATUS_FILE), "w") as f:
            json.dump({**record, "started": record["started"] - 3600}, f)
        assert sweep_lib.run_status(busy)["status"] == "stopped"
        assert cli.main(["sweep", path, "--root", root]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 4
    finally:
        run.kill()
        run.wait()


def test_a_run_started_on_another_host_is_skipped_with_how_to_run_it_again(tmp_path):
    path, root = _grid_file(tmp_path), str(tmp_path / "root")
    sweep = sweep_lib.expand(path, root)
    sweep_lib.write_records(sweep)
    for run in sweep.runs:  # all four: one started elsewhere, the others finished
        if run.index:
            os.makedirs(os.path.join(run.workdir, "final"))
    status = os.path.join(sweep.runs[0].workdir, sweep_lib.STATUS_FILE)
    with open(status, "w") as f:
        json.dump({"state": "running", "host": "vm-gone-123", "pid": 1, "started": time.time()}, f)
    log = io.StringIO()
    assert sweep_lib.run_locally(sweep, log=log)[sweep.runs[0].name] == "running"
    assert f"started on vm-gone-123, which this host cannot ask; if it is gone, delete {status}" in log.getvalue()
    os.remove(status)
    assert sweep_lib.run_status(sweep.runs[0].workdir)["status"] == "not started"


CHILD = """
import os, signal, sys, time
def save(*_):
    open(os.path.join(sys.argv[1], "saved"), "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
open(os.path.join(sys.argv[1], "pid"), "w").write(str(os.getpid()))
print("ready", flush=True)
time.sleep(60)
"""

PARENT = """
import sys
from unitoken_jax import sweep
sweep._run_one([sys.executable, "-c", sys.argv[2], sys.argv[1]], sys.argv[1])
"""

# Ctrl-C before Popen has returned (seen on a loaded CI machine): the child is running and ready
PARENT_CTRL_C_WHILE_STARTING = """
import os, signal, subprocess, sys, time
from unitoken_jax import sweep
class Slow(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        log = os.path.join(sys.argv[1], sweep.LOG_FILE)
        while "ready" not in open(log).read().splitlines():  # the child's own line, not the command's text
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
subprocess.Popen = Slow
sweep._run_one([sys.executable, "-c", sys.argv[2], sys.argv[1]], sys.argv[1])
"""


@contextlib.contextmanager
def _local_run(tmp_path, parent_script, child):
    """A sweep's local run of `child` by `parent_script`, once the child has said it is ready;
    the child is killed at the end if it was left going."""
    workdir = tmp_path / "run"
    parent = subprocess.Popen([sys.executable, "-c", parent_script, str(workdir), child], cwd=REPO,
                              start_new_session=True)
    log = workdir / sweep_lib.LOG_FILE
    try:
        deadline = time.time() + 60
        # the child's own "ready" line: the log's first line, the command, holds the word too, and
        # a SIGINT sent on it could come before the child has its SIGTERM handler (it then dies unsaved)
        while not (log.exists() and "ready" in log.read_text().splitlines()) and time.time() < deadline:
            time.sleep(0.1)
        yield workdir, parent, log
    finally:
        parent.kill()
        parent.wait()
        if (workdir / "pid").exists() and not (workdir / "saved").exists():  # the run left going
            with contextlib.suppress(ProcessLookupError):
                os.kill(int((workdir / "pid").read_text()), signal.SIGKILL)


@pytest.mark.parametrize("parent_script", [PARENT, PARENT_CTRL_C_WHILE_STARTING], ids=["running", "starting"])
def test_ctrl_c_during_run_locally_stops_the_run_with_the_sigterm_it_saves_on(tmp_path, parent_script):
    """Ctrl-C goes to the terminal's whole process group: the run's process got the SIGINT itself
    (a KeyboardInterrupt, no checkpoint) instead of the SIGTERM the sweep sends it; and a Ctrl-C
    while the run's process was being started left it running, unrecorded."""
    with _local_run(tmp_path, parent_script, CHILD) as (workdir, parent, log):
        if parent_script is PARENT:  # the other one sends its own, earlier
            os.killpg(parent.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        parent.wait(timeout=60)
        assert (workdir / "saved").exists(), log.read_text()
        with open(workdir / sweep_lib.STATUS_FILE) as f:
            record = json.load(f)
        assert (record["state"], record["exit_code"]) == ("exited", 0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_kill_or_closed_terminal_stops_the_sweep_and_its_run_with_a_save(tmp_path, signum):
    """`kill`, `timeout`, a job manager (SIGTERM) or a closed ssh session (SIGHUP) ended the sweep
    alone: its run, in a session of its own, trained on unseen, and the sweep's other runs never
    came. Each now stops the run as a Ctrl-C does: it gets its SIGTERM, saves and is recorded."""
    with _local_run(tmp_path, PARENT, CHILD) as (workdir, parent, log):
        os.kill(parent.pid, signum)  # the sweep's process alone, as `kill PID` or `timeout` sends it
        parent.wait(timeout=60)
        assert (workdir / "saved").exists(), log.read_text()
        record = json.loads((workdir / sweep_lib.STATUS_FILE).read_text())
        assert (record["state"], record["exit_code"], record["terminated"]) == ("exited", 0, True)
        assert sweep_lib.run_status(str(workdir))["status"] == "stopped"


def test_unitoken_sweep_killed_says_its_run_saved_and_starts_no_other(tmp_path):
    """The whole verb: `kill` of `unitoken sweep --run-locally` stops its run with a save, says so,
    exits 130 and starts none of the sweep's other runs."""
    path, root = _grid_file(tmp_path), tmp_path / "root"
    child = tmp_path / "child.py"  # the launcher stands in for the training: saves on SIGTERM
    child.write_text(textwrap.dedent('''
        import signal, sys, time
        def save(*_):
            open(sys.argv[1], "w").write("saved")
            sys.exit(0)
        signal.signal(signal.SIGTERM, save)
        print("ready", flush=True)
        time.sleep(60)
    '''))
    launcher = f"{shlex.quote(sys.executable)} {shlex.quote(str(child))} {shlex.quote(str(tmp_path))}/saved{{i}}"
    sweep = subprocess.Popen([sys.executable, "-c", "import sys; from unitoken_jax import cli; sys.exit(cli.main())",
                              "sweep", path, "--root", str(root), "--run-locally", "--launcher", launcher],
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        logs = lambda: [p.read_text() for p in root.glob("*/" + sweep_lib.LOG_FILE)]  # noqa: E731
        deadline = time.time() + 120
        while not any("ready" in log.splitlines() for log in logs()) and time.time() < deadline:
            time.sleep(0.1)
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=60)
    finally:
        sweep.kill()
    assert sweep.returncode == 130, err
    assert "unitoken sweep: stopped (its current run got a SIGTERM and saved; run the sweep again to resume it)" in err
    assert [p.name for p in tmp_path.glob("saved*")] == ["saved0"]
    assert len(logs()) == 1  # no other run started


CHILD_STARTING = """
import os, sys, time
open(os.path.join(sys.argv[1], "pid"), "w").write(str(os.getpid()))
print("ready", flush=True)  # still importing: no SIGTERM handler yet
time.sleep(60)
"""


def test_ctrl_c_while_the_run_is_still_starting_is_stopped_not_failed(tmp_path):
    """A run's process killed by the sweep's SIGTERM before the training loop's handler was there
    (imports, pipeline, restore, compile: minutes for the 7B) was reported failed, and the summary
    exited 1; it is stopped, as a Ctrl-C later is."""
    with _local_run(tmp_path, PARENT, CHILD_STARTING) as (workdir, parent, _):
        os.killpg(parent.pid, signal.SIGINT)
        parent.wait(timeout=60)
        record = json.loads((workdir / sweep_lib.STATUS_FILE).read_text())
        assert (record["state"], record["exit_code"]) == ("exited", -signal.SIGTERM)
        assert sweep_lib.run_status(str(workdir))["status"] == "stopped"
        # a run that dies of a SIGTERM the sweep did not send failed
        (workdir / sweep_lib.STATUS_FILE).write_text(json.dumps({**record, "terminated": False}))
        assert sweep_lib.run_status(str(workdir))["status"] == "failed"


def test_the_stage_configs_sweep_learning_rate_times_seed():
    sweep = sweep_lib.expand(os.path.join(REPO, "configs", "stage2.py:tiny"), "/sweeps/s2")
    assert [(r.overrides["optimizer.learning_rate"], r.overrides["data.seed"]) for r in sweep.runs] == [
        (0.0015, 0), (0.0015, 1), (0.003, 0), (0.003, 1), (0.006, 0), (0.006, 1)]
    assert all(r.config.model_name == "tiny" for r in sweep.runs)
    full = sweep_lib.expand(os.path.join(REPO, "configs", "stage2.py"), "/sweeps/s2")
    assert sorted({r.config.optimizer.learning_rate for r in full.runs}) == [5e-6, 1e-5, 2e-5]
    assert full.runs[0].config.model_name == "7b"


def test_an_unknown_key_is_an_error_that_names_it(tmp_path):
    path = _write(tmp_path, "typo.py", SMALL_CONFIG + '''
def sweep(add):
    add(**{"optimizer.learning_rate": 0.1})
    add(**{"optimizer.learnin_rate": 0.01})
''')
    with pytest.raises(sweep_lib.SweepError, match=r"'optimizer\.learnin_rate'.*optimizer has no 'learnin_rate'"):
        sweep_lib.expand(path, str(tmp_path / "root"))
    deeper = _write(tmp_path, "deeper.py", SMALL_CONFIG + '''
def sweep(add):
    add(**{"seed.value": 1})
''')
    with pytest.raises(sweep_lib.SweepError, match=r"'seed\.value'"):
        sweep_lib.expand(deeper, str(tmp_path / "root"))
    wrong_type = _write(tmp_path, "wrong_type.py", SMALL_CONFIG + '''
def sweep(add):
    add(**{"data.seed": "zero"})
''')
    with pytest.raises(sweep_lib.SweepError, match=r"data\.seed='zero'"):
        sweep_lib.expand(wrong_type, str(tmp_path / "root"))
    # a key given twice on the command line: the last had won, unsaid
    fine = _write(tmp_path, "fine.py", SMALL_CONFIG + '''
def sweep(add):
    add(**{"optimizer.learning_rate": 0.1})
''')
    with pytest.raises(sweep_lib.SweepError, match=r"--set total_steps given twice \(5 and 6\)"):
        sweep_lib.main(fine, str(tmp_path / "root2"), fixed=["total_steps=5", "config.total_steps=6"],
                       out=io.StringIO(), log=io.StringIO())


def test_a_run_the_train_command_would_stop_at_once_is_refused_when_the_sweep_expands(tmp_path, capsys):
    """A misspelt --set said ml_collections' repr ('\\'total_step\\'\\nDid you mean ...'); a value out
    of range printed commands whose every run stopped at its first line."""
    spec, root = os.path.join(REPO, "configs", "stage2.py:tiny"), str(tmp_path / "root")
    assert cli.main(["sweep", spec, "--root", root, "--set", "total_step=3"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "--config.total_step=3: the config has no field 'total_step'; did you mean \"total_steps\" instead of "
        "\"total_step\"?")
    assert cli.main(["sweep", spec, "--root", root, "--set", "total_steps=-1"]) == 2
    assert "the train command would stop at once: total_steps must be at least 1, got -1" in \
        capsys.readouterr().err
    # a --set of a key the sweep varies was dropped: each run's own value came later and won
    assert cli.main(["sweep", spec, "--root", root, "--set", "model_name=7b"]) == 2  # a label: nothing built from it
    assert "--config.model_name would only relabel the run" in capsys.readouterr().err
    assert cli.main(["sweep", spec, "--root", root, "--set", "optimizer.learning_rate=0.01"]) == 2
    assert "--set optimizer.learning_rate=0.01: the sweep sets optimizer.learning_rate itself (0.0015, 0.003, " \
        "0.006)" in capsys.readouterr().err
    # the full config starts from the stage before: without its path every run stopped once started
    # (on a TPU slice: after the slice was made and the 7B initialised)
    full = os.path.join(REPO, "configs", "stage2.py")
    assert cli.main(["sweep", full, "--root", root, "--set", "data.sources=/data/s2.yaml"]) == 2
    assert "init_from.kind='stage' needs init_from.paths: give --set init_from.paths=DIR" in capsys.readouterr().err
    assert not os.path.exists(root)
    assert cli.main(["sweep", full, "--root", root, "--set", "data.sources=/data/s2.yaml", "--set",
                     "init_from.paths=/ckpt/stage1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6
    root = str(tmp_path / "root2")
    assert cli.main(["sweep", spec, "--root", root]) == 0  # the config's own runs pass the check
    assert len(capsys.readouterr().out.splitlines()) == len(sweep_lib.expand(spec, root).runs)


def test_a_config_without_sweep_is_a_clear_error(tmp_path, capsys):
    path = _write(tmp_path, "plain.py", SMALL_CONFIG)
    with pytest.raises(sweep_lib.SweepError, match=r"plain\.py defines no sweep\(add\)"):
        sweep_lib.expand(path, str(tmp_path / "root"))
    assert cli.main(["sweep", path, "--root", str(tmp_path / "root")]) == 2
    assert "defines no sweep(add)" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "root")


def test_the_printed_launch_commands_are_exact(tmp_path, capsys):
    path = _grid_file(tmp_path)
    root = str(tmp_path / "sweeps" / "grid")
    assert cli.main(["sweep", path, "--root", root, "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [["python", "-m", "unitoken_jax.train", "--config", path, "--workdir",
                 os.path.join(root, f"learning_rate={lr},seed={seed}"),
                 f"--config.optimizer.learning_rate={lr}", f"--config.data.seed={seed}"]
                for lr in ("0.1", "0.01") for seed in (0, 1)]
    assert [shlex.split(line) for line in lines] == expected

    # a launcher prefix with placeholders, fixed overrides for every run, and a value that needs quoting
    quoted = _write(tmp_path, "quoted.py", SMALL_CONFIG + '''
def sweep(add):
    for lr in (0.5, 2e-05):
        add(**{"optimizer.learning_rate": lr, "data.sources": ("/data/a b", "/data/c")})
''')
    quoted_root = root + "-quoted"  # a root holds one sweep
    assert cli.main(["sweep", quoted + ":small", "--root", quoted_root, "--launcher",
                     "launch/tpu_train.sh --name slice-{i} --tag {run}", "--set", "total_steps=7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = ["learning_rate=0.5,sources=-data-a-b+-data-c", "learning_rate=2e-05,sources=-data-a-b+-data-c"]
    assert [shlex.split(line) for line in lines] == [
        ["launch/tpu_train.sh", "--name", f"slice-{i}", "--tag", name, "python", "-m", "unitoken_jax.train",
         "--config", quoted + ":small", "--workdir", os.path.join(quoted_root, name), "--config.total_steps=7",
         f"--config.optimizer.learning_rate={lr}", "--config.data.sources=('/data/a b', '/data/c')"]
        for i, (name, lr) in enumerate(zip(names, ("0.5", "2e-05")))]
    # what the train command makes of that line is the run's config
    run = sweep_lib.expand(quoted + ":small", quoted_root, {"total_steps": "7"}).runs[1]
    parsed = sweep_lib.parse_like_train(quoted + ":small", shlex.split(lines[1])[12:])
    assert parsed.to_dict() == run.config.to_dict()
    assert (parsed.total_steps, parsed.optimizer.learning_rate, parsed.data.sources) == (
        7, 2e-05, ("/data/a b", "/data/c"))

    # a launcher that builds the python command itself takes the train arguments where {args} is
    assert cli.main(["sweep", path, "--root", root, "--launcher",
                     "launch/tpu_train.sh --name s{i} {args} --env X=1"]) == 0
    first = shlex.split(capsys.readouterr().out.splitlines()[0])
    assert first == ["launch/tpu_train.sh", "--name", "s0", "--config", path, "--workdir",
                     os.path.join(root, "learning_rate=0.1,seed=0"), "--config.optimizer.learning_rate=0.1",
                     "--config.data.seed=0", "--env", "X=1"]

    with pytest.raises(sweep_lib.SweepError, match=r"'slice'.*\{run\}, \{i\}, \{args\} and \{command\}"):
        sweep_lib.main(path, root, launcher="launch/x.sh --name {slice}")
    # a URL root would give every run a workdir the training loop refuses: refused here, first
    for mode in ("print", "local", "summary"):
        with pytest.raises(sweep_lib.SweepError, match="Cloud Storage FUSE"):
            sweep_lib.main(path, "gs://bucket/sweep", mode=mode)


def test_a_value_of_the_wrong_type_or_one_the_command_line_cannot_carry_is_an_error(tmp_path):
    path = _write(tmp_path, "fraction.py", SMALL_CONFIG + '''
def sweep(add):
    add(**{"total_steps": 12.5})
''')
    with pytest.raises(sweep_lib.SweepError, match=r"total_steps=12\.5"):
        sweep_lib.expand(path, str(tmp_path / "root"))
    nested = _write(tmp_path, "nested.py", SMALL_CONFIG + '''
def sweep(add):
    add(**{"optimizer": {"learning_rate": 1.0, "b1": 0.5}})
''')
    with pytest.raises(sweep_lib.SweepError, match="optimizer=.*cannot be given on the command line"):
        sweep_lib.expand(nested, str(tmp_path / "root"))


def _events(logdir, steps):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(logdir)
    for step, values in steps:
        writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])))
    writer.close()


def test_statuses_and_last_metrics_are_read_from_the_workdirs(tmp_path, capsys):
    path = _grid_file(tmp_path)
    root = str(tmp_path / "root")
    # `false` and `true` stand in for the launcher: every run exits at once, 1 or 0, without training
    assert cli.main(["sweep", path, "--root", root, "--run-locally", "--launcher", "false {run}"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("failed (exit status 1)") == 4
    assert "[2/4] optimizer.learning_rate=0.1 data.seed=1: training in" in captured.err
    assert [line.split()[3] for line in captured.out.splitlines()[2:6]] == ["failed"] * 4
    assert captured.out.count("failed (exit status 1): see") == 4
    sweep = sweep_lib.expand(path, root)
    runs = sweep.runs
    assert sweep_lib.run_status(runs[0].workdir) == {"status": "failed", "exit_code": 1}
    assert "# " in open(os.path.join(runs[0].workdir, "train.log")).read()

    sweep_lib.run_locally(sweep_lib.Sweep(sweep.config_spec, root, (), runs[:1]), launcher="true")
    assert sweep_lib.run_status(runs[0].workdir) == {"status": "stopped", "exit_code": 0}
    # run 1 finished, with a resumed second event file re-logging step 2 later
    os.makedirs(os.path.join(runs[1].workdir, "final"))
    tb = os.path.join(runs[1].workdir, "tensorboard")
    _events(tb, [(1, {"loss": 9.0, "ce_understanding": 9.5, "ce_generation": 8.5}),
                 (2, {"loss": 8.0, "ce_understanding": 8.5, "ce_generation": 7.5})])
    time.sleep(1.1)  # event files are named by the second
    _events(tb, [(2, {"loss": 7.0, "ce_understanding": 7.5, "ce_generation": 6.5})])
    assert sweep_lib.final_metrics(runs[1].workdir) == {"loss": 7.0, "ce_understanding": 7.5, "ce_generation": 6.5,
                                                        "step": 2}
    # run 2 alive here (this process stands in for it); run 3 launched elsewhere, checkpoints but no final
    with open(os.path.join(runs[2].workdir, "sweep_status.json"), "w") as f:
        json.dump({"state": "running", "pid": os.getpid(), "host": __import__("socket").gethostname()}, f)
    os.remove(os.path.join(runs[3].workdir, "sweep_status.json"))
    os.makedirs(os.path.join(runs[3].workdir, "checkpoints"))

    for extra, name in ((["other.py"], "config file"), (["--set", "total_steps=5"], "--set"),
                        (["--launcher", "echo"], "--launcher")):  # read by nothing
        assert cli.main(["sweep", *extra, "--root", root, "--summary-only"]) == 2, extra
        assert f"--summary-only reads what {root} holds and takes no {name}\n" in capsys.readouterr().err
    # a logging window whose every step was skipped logs a NaN loss: JSON's null, not a bare NaN
    _events(os.path.join(runs[3].workdir, "tensorboard"), [(1, {"loss": float("nan"),
                                                                "ce_generation": float("inf")})])
    assert cli.main(["sweep", "--root", root, "--summary-only", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert rows[3]["metrics"] == {"loss": None, "ce_generation": None}
    assert [row["status"] for row in rows] == ["stopped", "finished", "running", "started"]
    assert rows[1]["metrics"] == {"loss": 7.0, "ce_understanding": 7.5, "ce_generation": 6.5}
    assert (rows[1]["step"], rows[1]["total_steps"]) == (2, 10)
    assert rows[1]["overrides"] == {"optimizer.learning_rate": 0.1, "data.seed": 1}
    # accumulating 4 micro-batches an update, the loop logs 4 steps an update: 10 updates end at step 40
    config = json.load(open(os.path.join(runs[1].workdir, "config.json")))
    config["optimizer"]["accumulation_steps"] = 4
    json.dump(config, open(os.path.join(runs[1].workdir, "config.json"), "w"))
    assert sweep_lib.summarize(root)[1]["total_steps"] == 40

    # run locally again: finished and running runs are skipped, the others start (and fail) again
    assert cli.main(["sweep", path, "--root", root, "--run-locally", "--launcher", "false"]) == 1
    err = capsys.readouterr().err
    assert "[2/4] optimizer.learning_rate=0.1 data.seed=1: finished already, skipped" in err
    assert "[3/4] optimizer.learning_rate=0.01 data.seed=0: running already, skipped" in err
    assert err.count("(resuming)") == 2


STAGE2_SWEEP = '''
from unitoken_jax.configs import stages as _stages


def get_config(arg=""):
    c = _stages.stage_config(2, "tiny")
    c.data.demo = False  # one small dataset for all runs, built by the test
    c.data.sources = ({data!r},)
    c.data.num_threads = 1
    c.mesh.num_devices = 1
    c.total_steps = 3
    c.log_every = 1
    c.checkpoint_every = 3
    return c


def sweep(add):
    for lr in (1e-3, 3e-3):
        for seed in (0, 1):
            add(**{{"optimizer.learning_rate": lr, "data.seed": seed}})
'''


@pytest.mark.slow
def test_a_tiny_stage2_grid_trains_here_is_summarised_and_is_skipped_when_run_again(tmp_path, capsys, monkeypatch):
    from unitoken_jax.data.demo import build_demo_dataset

    data = build_demo_dataset(str(tmp_path / "demo"), n=16)
    path = str(tmp_path / "stage2_grid.py")
    with open(path, "w") as f:
        f.write(STAGE2_SWEEP.format(data=data))
    root = str(tmp_path / "sweep")
    monkeypatch.setenv("XLA_FLAGS", CHEAP_COMPILES)  # the runs get one CPU device, not the tests' 16
    # the runs share one compilation cache, as a real sweep's do (~/.cache/unitoken_jax/xla): a run
    # whose overrides leave its programs unchanged (the data seed) loads them instead of compiling
    monkeypatch.setenv("UNITOKEN_COMPILATION_CACHE", str(tmp_path / "xla"))
    monkeypatch.chdir(REPO)

    assert cli.main(["sweep", path, "--root", root, "--run-locally"]) == 0, \
        open(os.path.join(root, "learning_rate=0.001,seed=0", "train.log")).read()[-3000:]
    captured = capsys.readouterr()
    assert captured.err.count(": finished (exit status 0)") == 4, captured.err
    lines = captured.out.splitlines()
    assert lines[0].split() == ["#", "optimizer.learning_rate", "data.seed", "status", "step", "loss",
                                "ce_understanding", "ce_generation"]
    rows = [line.split() for line in lines[2:]]
    assert [row[:5] for row in rows] == [[str(i), lr, seed, "finished", "3/3"]
                                         for i, (lr, seed) in enumerate([("0.001", "0"), ("0.001", "1"),
                                                                         ("0.003", "0"), ("0.003", "1")])]
    losses = [[float(v) for v in row[5:]] for row in rows]
    assert all(math.isfinite(v) and 0 < v < 20 for row in losses for v in row), losses
    assert len({row[0] for row in losses}) == 4  # each run's overrides reached it
    how = {name: re.search(r"train step (compiled|loaded from the compilation cache)",
                           open(os.path.join(root, name, "train.log")).read()).group(1)
           for name in ("learning_rate=0.001,seed=0", "learning_rate=0.001,seed=1", "learning_rate=0.003,seed=1")}
    assert how == {"learning_rate=0.001,seed=0": "compiled",  # the first run of the sweep
                   "learning_rate=0.001,seed=1": "loaded from the compilation cache",
                   "learning_rate=0.003,seed=1": "loaded from the compilation cache"}, how

    records = {name: os.path.getmtime(os.path.join(root, name, "sweep_status.json")) for name in os.listdir(root)
               if os.path.isdir(os.path.join(root, name))}
    t0 = time.time()
    assert cli.main(["sweep", path, "--root", root, "--run-locally"]) == 0
    assert time.time() - t0 < 30
    captured = capsys.readouterr()
    assert captured.err.count("finished already, skipped") == 4
    assert captured.out.splitlines()[2:] == lines[2:]
    assert records == {name: os.path.getmtime(os.path.join(root, name, "sweep_status.json")) for name in records}
