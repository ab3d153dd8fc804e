"""Hyper-parameter sweeps: a config file's `sweep(add)` expanded into training runs.

The convention is big_vision's: next to `get_config(arg)` a config file may define

    def sweep(add):                      # or sweep(add, arg): then it also gets the config argument
        for lr in (1e-3, 3e-3):
            for seed in (0, 1):
                add(**{"optimizer.learning_rate": lr, "data.seed": seed})

and every `add(...)` call is one run: the config with those dotted keys overridden. A run lives in
`ROOT/<name>`, the name made from its overrides (`learning_rate=0.001,seed=0`), and is the exact
command `python -m unitoken_jax.train --config FILE:ARG --workdir ROOT/<name> --config.k=v ...`.
Each command is parsed back here with ml_collections' own flag parser before anything starts, so
a value that would not survive the command line is an error now, not a surprise on a TPU slice.

    unitoken sweep configs/stage2.py:tiny --root /tmp/s2 --run-locally     # one process a run, here
    unitoken sweep configs/stage2.py --root /mnt/bucket/s2 --set init_from.paths=/mnt/bucket/stage1 \\
        --launcher "launch/tpu_train.sh --name s2-{i} --zone Z --project P {args}"   # print commands
    unitoken sweep --root /tmp/s2 --summary-only [--json]     # overrides, status, last step and losses
                                                              # (and the last held-out losses of runs
                                                              # that evaluate: config.eval)

    ROOT/sweep.json                    the config, the fixed `--set` overrides and every run
    ROOT/<run>/overrides.json          that run's overrides
    ROOT/<run>/config.json             its whole config, as the training loop records it
    ROOT/<run>/sweep_status.json       runs started here: pid, host, exit code, seconds
    ROOT/<run>/train.log               runs started here: their output

A run is *finished* when its workdir has `final/`. Runs started here are *running* (their process
is alive), *failed* (non-zero exit), or *stopped* (exit 0 without `final/`: `stop_after` or a
SIGTERM; rerun to go on). A run started elsewhere (`--print-commands`) that has written
checkpoints or metrics but no `final/` is *started* (running, or stopped: this host cannot tell);
nothing yet is *not started*. Re-running a sweep skips finished and running runs (printing, too: a
run whose process is alive here is not printed again); the others resume from their latest
checkpoint, as the training loop always does. A ROOT holds one sweep: expanding a different config
or other `--set` overrides into it is refused (the runs would resume from the other sweep's
checkpoints). ROOT must be reachable from where the sweep is expanded, too: the records go there.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Callable, TextIO

import ml_collections
from absl import flags as absl_flags
from ml_collections import config_flags

from unitoken_jax import configs
from unitoken_jax.convert.files import pid_alive

TRAIN_MODULE = "unitoken_jax.train"
SWEEP_FILE = "sweep.json"
STATUS_FILE = "sweep_status.json"
LOG_FILE = "train.log"
METRICS = ("loss", "ce_understanding", "ce_generation")
EVAL_METRICS = ("eval/loss", "eval/ce_understanding", "eval/ce_generation")  # columns when some run evaluates
MAX_NAME = 120


class SweepError(ValueError):
    """A sweep that cannot be expanded or launched as written."""


@dataclasses.dataclass(frozen=True)
class Run:
    index: int
    name: str
    overrides: dict[str, Any]
    config: ml_collections.ConfigDict  # the base config with the fixed and the run's overrides applied
    flags: tuple[str, ...]  # --config.k=v, the fixed ones first
    workdir: str
    # the config as the train command records it in WORKDIR/config.json (see `expand`'s `check`)
    record: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Sweep:
    config_spec: str  # FILE.py[:ARG], as the train command takes it
    root: str
    fixed_flags: tuple[str, ...]
    runs: list[Run]


# --- expansion ---------------------------------------------------------------------------------
def expand(config_spec: str, root: str, fixed: dict[str, str] | None = None,
           check: Callable[[ml_collections.ConfigDict], Any] | None = None) -> Sweep:
    """The runs of `config_spec`'s sweep; `fixed` ({dotted key: command-line text}) applies to all.
    A spec naming no existing file resolves to the packaged config of that name (`configs.resolve_spec`);
    the commands keep the spec as given (the train command resolves it on its own host).
    `check(config)` raises ValueError for a run's config the train command would stop at once, and
    returns the config as the train command reads it (the CLI passes `TrainConfig.from_config_dict`:
    this module does not import the training code); its `to_dict()` is what the run's config.json
    holds, the record the training loop compares a resumed run's config with."""
    given, config_spec = config_spec, configs.resolve_spec(config_spec)
    module, arg = configs.load_module(config_spec)
    if not callable(getattr(module, "sweep", None)):
        raise SweepError(f"{config_spec.partition(':')[0]} defines no sweep(add): add one next to get_config, e.g. "
                         "def sweep(add): [add(**{'optimizer.learning_rate': lr}) for lr in (1e-4, 3e-4)]")
    fixed_flags = tuple(f"--config.{key}={text}" for key, text in (fixed or {}).items())
    # the fixed overrides are command-line text: let the train command's parser read them
    base = parse_like_train(config_spec, fixed_flags) if fixed_flags else \
        (module.get_config(arg) if arg is not None else module.get_config())

    added: list[dict[str, Any]] = []

    def add(**overrides):
        added.append({key: _plain(value) for key, value in overrides.items()})

    params = list(inspect.signature(module.sweep).parameters.values())
    if len(params) >= 2 and arg is not None:
        module.sweep(add, arg)
    elif len(params) >= 2 and params[1].default is inspect.Parameter.empty:
        raise SweepError(f"{config_spec}: sweep(add, {params[1].name}) takes the config argument; give one after a "
                         f"colon, e.g. {config_spec}:ARG")
    else:
        module.sweep(add)
    if not added:
        raise SweepError(f"{config_spec}: sweep(add) called add() no times")
    _check_fixed_and_swept_apart(fixed or {}, added)
    names = run_names(added)
    seen: dict[str, int] = {}
    runs = []
    for i, (overrides, name) in enumerate(zip(added, names)):
        config = apply_overrides(base, overrides)
        # the same config however its overrides were written (key order, 1 or 1.0): one run
        same = json.dumps(config.to_dict(), sort_keys=True, default=repr)
        if same in seen:
            j = seen[same]
            raise SweepError(f"the sweep adds the same run twice ({j}: {added[j]} and {i}: {overrides})")
        seen[same] = i
        flags = fixed_flags + tuple(f"--config.{key}={_flag_text(key, value)}" for key, value in overrides.items())
        _check_round_trip(config_spec, flags, config, name)
        record = None
        if check is not None:
            try:
                checked = check(config)
            except ValueError as e:
                raise SweepError(f"run {name}: the train command would stop at once: {e}") from e
            record = checked.to_dict() if hasattr(checked, "to_dict") else None
            init = config.get("init_from")
            if init is not None and init.get("kind") in ("stage", "checkpoint") and not init.get("paths"):
                # (the train command checks it once it starts: after a slice is made and a 7B initialised)
                raise SweepError(f"run {name}: init_from.kind={init.kind!r} needs init_from.paths: give "
                                 "--set init_from.paths=DIR (the checkpoint the runs start from)")
        runs.append(Run(i, name, overrides, config, flags, os.path.join(root, name), record))
    return Sweep(given, root, fixed_flags, runs)


def _check_fixed_and_swept_apart(fixed: dict[str, str], added: list[dict[str, Any]]) -> None:
    """A fixed override (--set) of a key the sweep sets too would be overridden by every run's own
    value (its flag comes later): refused, not dropped. So is either one of a field that only
    labels a run (`configs.LABELS`: the runs would all be the same)."""
    try:
        configs.check_no_label_overrides([*fixed, *(key for overrides in added for key in overrides)])
    except ValueError as e:
        raise SweepError(str(e)) from None
    for key in fixed:
        values = sorted({repr(o[key]) for o in added if key in o})
        if values:
            raise SweepError(f"--set {key}={fixed[key]}: the sweep sets {key} itself ({', '.join(values)}), "
                             "and each run's value would win; drop the --set, or change sweep(add)")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with the dotted keys set; a key the config does not have is an error."""
    config = copy.deepcopy(config)  # keeps FieldReferences, as the train command's config does
    for key, value in overrides.items():
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:depth]) or "the config"
                has = f"it has {sorted(node.keys())}" if isinstance(node, ml_collections.ConfigDict) else \
                    f"it is a {type(node).__name__}"
                raise SweepError(f"unknown config key {key!r}: {where} has no {part!r} ({has})")
            if depth < len(parts) - 1:
                node = node[part]
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError) as e:
            raise SweepError(f"cannot set {key}={value!r}: {e}") from e
    return config


def parse_like_train(config_spec: str, flags) -> ml_collections.ConfigDict:
    """The config that `python -m unitoken_jax.train --config SPEC FLAGS...` would train with."""
    argv = ["train", "--config", config_spec, *flags]
    values = absl_flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    try:
        with warnings.catch_warnings():  # ml_collections loads the file with the deprecated load_module()
            warnings.simplefilter("ignore", DeprecationWarning)
            values(argv)
    except (absl_flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        unknown = configs.unknown_field(e)
        why = f"the config has no field {unknown[0]!r}" + (f"; {unknown[1]}" if unknown[1] else "") if unknown else e
        raise SweepError(f"the train command would reject {' '.join(flags)}: {why}") from e
    return holder.value


def _check_round_trip(config_spec, flags, config, name) -> None:
    want, got = configs.flat_dict(config.to_dict()), configs.flat_dict(parse_like_train(config_spec, flags).to_dict())
    differ = [k for k in sorted(set(want) | set(got)) if want.get(k, "<missing>") != got.get(k, "<missing>")]
    if differ:
        details = ", ".join(f"{k}: {want.get(k)!r} here, {got.get(k)!r} there" for k in differ[:5])
        raise SweepError(f"run {name}: the train command would not see the same config ({details}); use values "
                         "of the fields' own types (numbers, strings, booleans, tuples of them)")


def _plain(value):
    """numpy scalars -> Python ones (their repr is not a literal); lists -> tuples."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def _flag_text(key: str, value) -> str:
    if isinstance(value, (bool, int, str)):
        return str(value)
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, tuple):
        return repr(value)
    raise SweepError(f"{key}={value!r}: a {type(value).__name__} cannot be given on the command line; sweep over "
                     "numbers, strings, booleans or tuples of them")


def _value_text(value) -> str:
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, tuple):
        return "+".join(_value_text(v) for v in value)
    return str(value)


def run_names(added: list[dict[str, Any]]) -> list[str]:
    """`leaf=value,leaf=value` for each run (the full dotted key where two keys share a leaf), the keys
    in the order the sweep first adds them."""
    keys = list(dict.fromkeys(k for overrides in added for k in overrides))
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    label = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}
    names = []
    for overrides in added:
        name = ",".join(f"{label[k]}={_value_text(overrides[k])}" for k in keys if k in overrides) or "base"
        name = re.sub(r"[^A-Za-z0-9._=+,-]", "-", name)
        if len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME - 9]}-{_digest(overrides)}"
        names.append(name)
    for name in {n for n in names if names.count(n) > 1}:
        same = [i for i, n in enumerate(names) if n == name]
        if any(added[i] != added[same[0]] for i in same):  # distinct overrides that read the same
            for i in same:
                names[i] = f"{name}-{_digest(added[i])}"
    return names  # identical overrides keep one name: expand() reports them


def _digest(overrides) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()[:8]


# --- commands and records --------------------------------------------------------------------
def command(sweep: Sweep, run: Run, python: str = "python") -> list[str]:
    return [python, "-m", TRAIN_MODULE, "--config", sweep.config_spec, "--workdir", run.workdir, *run.flags]


def command_line(sweep: Sweep, run: Run, launcher: str | None = None, python: str = "python") -> str:
    """The run's shell command line. A launcher template is filled in with `{run}` (the run's name),
    `{i}` (its index from 0), and where it has them `{args}` (the train arguments, from --config on:
    for scripts that build the python command themselves, as launch/tpu_train.sh does) or
    `{command}` (the whole command); a template with neither is a prefix to the whole command."""
    argv = command(sweep, run, python)
    if not launcher:
        return shlex.join(argv)
    try:
        filled = launcher.format(run=run.name, i=run.index, args=shlex.join(argv[3:]), command=shlex.join(argv))
    except (KeyError, IndexError, ValueError) as e:
        raise SweepError(f"--launcher {launcher!r}: {e!r}; its placeholders are {{run}}, {{i}}, {{args}} and "
                         "{command} (write {{ and }} for literal braces)") from e
    return filled if re.search(r"(?<!{){(args|command)}", launcher) else f"{filled} {shlex.join(argv)}"


def write_records(sweep: Sweep) -> None:
    """ROOT/sweep.json (runs of an earlier expansion that this one lacks stay listed, last) and each
    unfinished run's overrides.json and config.json. An earlier expansion of another config, or with
    other fixed overrides, is refused: its runs' checkpoints are in the same workdirs."""
    earlier = _read_json(os.path.join(sweep.root, SWEEP_FILE)) or {}
    now = _record_key(sweep.config_spec)
    if earlier:
        # (older records have only the spec as typed, compared as both resolve from here)
        was, now_key = ((earlier["config_file"], now) if "config_file" in earlier
                        else (_spec_key(earlier.get("config", "")), _spec_key(sweep.config_spec)))
        if was != now_key or sorted(earlier.get("fixed", [])) != sorted(sweep.fixed_flags):
            raise SweepError(
                f"{sweep.root} holds a sweep of {earlier.get('config')} with {earlier.get('fixed') or 'no'} fixed "
                f"overrides; this one is {sweep.config_spec} with {list(sweep.fixed_flags) or 'no'} fixed overrides, "
                "and its runs would resume from that sweep's checkpoints: give another --root")
        # an edited sweep(add) whose run keeps its name but not its settings (a swept key renamed)
        # would take that run's checkpoints, or its final results, for its own
        before = {r["name"]: r.get("overrides") for r in earlier.get("runs", [])}
        for run in sweep.runs:
            overrides = json.loads(json.dumps(run.overrides, default=repr))
            if run.name in before and before[run.name] != overrides:
                raise SweepError(
                    f"run {run.name} of {sweep.root} was {before[run.name]} and is now {overrides} (sweep(add) "
                    f"edited?): its workdir holds the other settings' checkpoints and results; give another --root")
    os.makedirs(sweep.root, exist_ok=True)
    listed = [{"name": r.name, "overrides": r.overrides, "command": command(sweep, r)} for r in sweep.runs]
    names = {r.name for r in sweep.runs}
    listed += [r for r in earlier.get("runs", []) if r["name"] not in names]
    _write_json(os.path.join(sweep.root, SWEEP_FILE),
                {"config": sweep.config_spec, "config_file": now, "fixed": list(sweep.fixed_flags), "runs": listed})
    for run in sweep.runs:
        if os.path.isdir(os.path.join(run.workdir, "final")):
            continue
        os.makedirs(run.workdir, exist_ok=True)
        _write_json(os.path.join(run.workdir, "overrides.json"), run.overrides)
        config_json = os.path.join(run.workdir, "config.json")
        if os.path.exists(config_json) and _has_checkpoints(run.workdir):
            # what its checkpoints were trained with: the training loop compares the run's config with
            # it when the run resumes, and names what changed (keeping it as config.previousN.json)
            continue
        record = run.record if run.record is not None else json.loads(run.config.to_json_best_effort())
        with open(config_json, "w") as f:
            json.dump(record, f, indent=2, default=repr)


def _has_checkpoints(workdir: str) -> bool:
    checkpoints = os.path.join(workdir, "checkpoints")
    return os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))


def _record_key(spec: str) -> str:
    """What names a sweep's config in its record: a file of the user's by its absolute path (a
    relative path typed from another directory names the same file), a packaged config by its name
    (the same config wherever the package is installed)."""
    file, colon, arg = spec.partition(":")
    if os.path.isfile(os.path.expanduser(file)):
        return os.path.realpath(os.path.expanduser(file)) + colon + arg
    return spec


def _spec_key(spec: str) -> str:
    """A config spec as the file it names (absolute) and its argument, to compare two spellings."""
    try:
        spec = configs.resolve_spec(spec)
    except FileNotFoundError:
        pass
    file, colon, arg = spec.partition(":")
    return os.path.realpath(file) + colon + arg


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


# --- running here --------------------------------------------------------------------------------
def _describe(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={_value_text(v)}" for k, v in overrides.items()) or "(no overrides)"


def run_locally(sweep: Sweep, launcher: str | None = None, log: TextIO | None = None) -> dict[str, str]:
    """Runs the unfinished runs one after another, each in its own process; returns {run: status}."""
    log = log or sys.stderr
    n, statuses = len(sweep.runs), {}
    for run in sweep.runs:
        head = f"[{run.index + 1}/{n}] {_describe(run.overrides)}"
        before = run_status(run.workdir)
        if before["status"] in ("finished", "running"):
            elsewhere = before.get("host")
            hint = (f" (started on {elsewhere}, which this host cannot ask; if it is gone, delete "
                    f"{os.path.join(run.workdir, STATUS_FILE)} to run it again)" if elsewhere else "")
            print(f"{head}: {before['status']} already{hint}, skipped", file=log, flush=True)
            statuses[run.name] = before["status"]
            continue
        again = " (resuming)" if before["status"] != "not started" else ""
        print(f"{head}: training in {run.workdir}{again}", file=log, flush=True)
        argv = shlex.split(command_line(sweep, run, launcher, python=sys.executable))
        exit_code, seconds = _run_one(argv, run.workdir)
        statuses[run.name] = run_status(run.workdir)["status"]
        see = f"; see {os.path.join(run.workdir, LOG_FILE)}" if exit_code else ""
        print(f"{head}: {statuses[run.name]} (exit status {exit_code}) after {seconds:.0f} s{see}", file=log,
              flush=True)
    return statuses


# what stops a local run: Ctrl-C, and the signals a `kill`, `timeout`, a job manager or a closed
# terminal send; each stops the sweep and its current run as a Ctrl-C does (the run saves)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _stop_signals(hold: bool):
    """Inside, each of STOP_SIGNALS raises KeyboardInterrupt, or with `hold` is recorded in the
    yielded list instead (main thread only: Python delivers signals there); handlers do not survive
    exec, so a child started inside keeps its own."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame):
        if not hold:
            raise KeyboardInterrupt
        got.append(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield got
    finally:
        for signum, was in previous.items():
            signal.signal(signum, was)


def _run_one(argv: list[str], workdir: str) -> tuple[int, float]:
    os.makedirs(workdir, exist_ok=True)
    record_path = os.path.join(workdir, STATUS_FILE)
    t0 = time.time()
    record = {"state": "running", "host": socket.gethostname(), "started": t0, "command": argv}
    with open(os.path.join(workdir, LOG_FILE), "a") as out:
        out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}\n")
        out.flush()
        # a session of its own: a Ctrl-C here must not reach it as a SIGINT (no save), but as the
        # SIGTERM below, on which the training loop saves a checkpoint. A stop while it is being
        # started is held until then: raised inside Popen, it would leave the run going unrecorded.
        # A SIGTERM or SIGHUP to the sweep stops it so too (by default they ended the sweep alone,
        # its run training on unseen).
        with _stop_signals(hold=False):
            with _stop_signals(hold=True) as interrupted:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                _write_json(record_path, {**record, "pid": proc.pid})
            try:
                if interrupted:
                    raise KeyboardInterrupt
                exit_code = proc.wait()
            finally:  # stopped: the training loop saves on SIGTERM, then the record says how it ended
                # (a second stop here leaves the run to finish the save its SIGTERM began)
                terminated = proc.poll() is None
                if terminated:
                    proc.terminate()
                    proc.wait()
                exit_code = proc.returncode
                seconds = time.time() - t0
                # (a run still importing, before the loop's SIGTERM handler, dies of the signal:
                # stopped as a saved one is, not failed)
                _write_json(record_path, {**record, "pid": proc.pid, "state": "exited", "exit_code": exit_code,
                                          "seconds": round(seconds, 1), "terminated": terminated})
    return exit_code, seconds


# --- status and summary ----------------------------------------------------------------------
def run_status(workdir: str) -> dict[str, Any]:
    """{"status": finished | running | failed | stopped | started | not started, "exit_code": int | None},
    and "host" for a run started on another host (running, as far as this one can tell)."""
    record = _read_json(os.path.join(workdir, STATUS_FILE)) or {}
    exit_code = record.get("exit_code")
    if os.path.isdir(os.path.join(workdir, "final")):
        return {"status": "finished", "exit_code": exit_code}
    if record.get("state") == "running":
        if record.get("host") != socket.gethostname():  # its process cannot be asked from here
            return {"status": "running", "exit_code": exit_code, "host": record.get("host")}
        status = "running" if pid_alive(record["pid"]) and _started_near(record["pid"], record.get("started")) \
            else "stopped"
    elif record.get("state") == "exited":
        by_us = record.get("terminated") and exit_code == -signal.SIGTERM  # the sweep's Ctrl-C stopped it
        status = "failed" if exit_code and not by_us else "stopped"
    elif any(os.path.isdir(os.path.join(workdir, d)) for d in ("checkpoints", "tensorboard")):
        status = "started"
    else:
        status = "not started"
    return {"status": status, "exit_code": exit_code}


def _started_near(pid: int, started, slack: float = 120.0) -> bool:
    """Did process `pid` start within `slack` seconds of `started` (the record's time)? After a
    restart of the host or container its number may be another process's. True where this cannot
    be read (no /proc: the number alone decides, as before)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22, starttime (ticks since boot)
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return abs(boot + ticks / os.sysconf("SC_CLK_TCK") - float(started)) <= slack
    except (OSError, ValueError, IndexError, StopIteration, TypeError):
        return True


def final_metrics(workdir: str) -> dict[str, float]:
    """The last logged value of each of METRICS and EVAL_METRICS (and the step of the last loss)
    from WORKDIR/tensorboard."""
    logdir = os.path.join(workdir, "tensorboard")
    if not os.path.isdir(logdir):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    out: dict[str, float] = {}
    for tag in METRICS + EVAL_METRICS:
        if tag in tags:
            # a resumed run logs some steps twice: the later one counts
            last = max(events.Scalars(tag), key=lambda e: (e.step, e.wall_time))
            out[tag] = last.value
            if tag == "loss":
                out["step"] = last.step
    return out


def summarize(root: str) -> list[dict[str, Any]]:
    """One row per run listed in ROOT/sweep.json: overrides, status, last step and metrics."""
    listed = _read_json(os.path.join(root, SWEEP_FILE))
    if listed is None:
        raise FileNotFoundError(f"{root} is not a sweep root (no {SWEEP_FILE}); expand a sweep into it first")
    rows = []
    for i, entry in enumerate(listed["runs"]):
        workdir = os.path.join(root, entry["name"])
        config = _read_json(os.path.join(workdir, "config.json")) or {}
        metrics = final_metrics(workdir)
        # the loop logs a step a micro-batch: with accumulation, total_steps (updates) times it
        total, accumulation = config.get("total_steps"), (config.get("optimizer") or {}).get("accumulation_steps")
        rows.append({"index": i, "run": entry["name"], "workdir": workdir, "overrides": entry["overrides"],
                     **run_status(workdir), "step": metrics.pop("step", None),
                     "total_steps": total * (accumulation or 1) if total else total, "metrics": metrics})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row["overrides"]))
    metrics = METRICS + tuple(m for m in EVAL_METRICS if any(m in row["metrics"] for row in rows))
    header = ["#", *keys, "status", "step", *metrics]
    lines = [header]
    for row in rows:
        step = "-" if row["step"] is None else f"{row['step']}/{row['total_steps'] or '?'}"
        values = [row["metrics"].get(m) for m in metrics]
        lines.append([str(row["index"]), *(_value_text(_plain(row["overrides"][k])) if k in row["overrides"] else ""
                                           for k in keys),
                      row["status"], step, *("-" if v is None else f"{v:.4f}" for v in values)])
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    failed = [row for row in rows if row["status"] == "failed"]
    text += [f"run {row['index']} failed (exit status {row['exit_code']}): see "
             f"{os.path.join(row['workdir'], LOG_FILE)}" for row in failed]
    return "\n".join(text)


# --- the `unitoken sweep` verb ------------------------------------------------------------------
def main(config_spec: str | None, root: str, *, mode: str = "print", launcher: str | None = None,
         fixed: list[str] | None = None, as_json: bool = False, out: TextIO | None = None,
         log: TextIO | None = None, check: Callable[[ml_collections.ConfigDict], Any] | None = None) -> int:
    """mode: "print" (one launch command a line), "local" (run here, then the summary) or "summary";
    `check`: as `expand` takes it. Returns the exit status: 1 when the summary shows a failed run."""
    out, log = out or sys.stdout, log or sys.stderr
    if "://" in root:  # the runs write through the file system (the training loop refuses URLs too)
        raise SweepError(f"--root {root} is a URL; give a directory every run's hosts see, e.g. a bucket mounted "
                         "with Cloud Storage FUSE (launch/tpu_install.sh --bucket): /mnt/BUCKET/sweeps/...")
    if mode == "summary":  # (it reads the root's own records: these would be taken as said and not used)
        given = [name for name, value in (("config file", config_spec), ("--set", fixed), ("--launcher", launcher))
                 if value]
        if given:
            raise SweepError(f"--summary-only reads what {root} holds and takes no {', '.join(given)}")
    else:
        if not config_spec:
            raise SweepError("give the config file (FILE.py[:ARG]) whose sweep(add) to expand")
        pairs = {}
        for item in fixed or []:
            key, eq, text = item.partition("=")
            if not eq:
                raise SweepError(f"--set {item!r}: write KEY=VALUE, e.g. --set init_from.paths=/ckpt/stage1")
            key = key.removeprefix("config.")
            if key in pairs:  # (the last had won, unsaid)
                raise SweepError(f"--set {key} given twice ({pairs[key]} and {text}): give one; a sweep over values "
                                 "is the config's sweep(add)")
            pairs[key] = text
        sweep = expand(config_spec, root, pairs, check)
        write_records(sweep)
        if mode == "print":
            status = {r.name: run_status(r.workdir)["status"] for r in sweep.runs}
            todo = [r for r in sweep.runs if status[r.name] not in ("finished", "running")]
            for state in ("finished", "running"):
                n = sum(s == state for s in status.values())
                if n:
                    print(f"sweep: {n} of {len(sweep.runs)} runs {state} already; not listed", file=log)
            if as_json:
                json.dump([{"index": r.index, "run": r.name, "workdir": r.workdir, "overrides": r.overrides,
                            "command": command_line(sweep, r, launcher)} for r in todo], out, indent=2)
                out.write("\n")
            else:
                for run in todo:
                    print(command_line(sweep, run, launcher), file=out)
            return 0
        run_locally(sweep, launcher, log)
    rows = summarize(root)
    if as_json:  # (a NaN or infinite loss is null: JSON has no word for them, strict readers refuse NaN)
        for row in rows:
            row["metrics"] = {k: v if math.isfinite(v) else None for k, v in row["metrics"].items()}
        json.dump(rows, out, indent=2, allow_nan=False)
        out.write("\n")
    else:
        print(format_table(rows), file=out)
    return 1 if any(row["status"] == "failed" for row in rows) else 0


