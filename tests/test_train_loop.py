"""The training loop end to end on the tiny stage configs and the drawn demo data: the loss falls;
stop-and-resume in a new process equals the uninterrupted run bit for bit, after `stop_after` and
after a SIGTERM to the run and its data workers; 8 devices give the loss of 1; two processes on
gloo train and save one checkpoint, draw the eval pictures one process draws alone, resume
together from a checkpoint only one of them cannot read,
stop together at one saved step when one is preempted, and put in the features of their own
pictures; stage I freezes the decoder and stage II starts from its ViT
and adapter; a streak of non-finite steps stops the run cleanly."""

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CHEAP_COMPILES
from unitoken_jax.data import pretokenize
from unitoken_jax.data.demo import build_demo_dataset
from unitoken_jax.configs import stages
from unitoken_jax.model import UniTokenModel, load
from unitoken_jax.models.config import UniTokenConfig
from unitoken_jax.train.config import TrainConfig
from unitoken_jax.train import loop
from unitoken_jax.train.loop import TrainingDiverged, initial_params, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stages():
    return stages


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_demo_dataset(str(tmp_path_factory.mktemp("demo")), n=96)


def _config(stage, data, **overrides):
    c = _stages().stage_config(stage, "tiny")
    c.data.demo = False
    c.data.sources = (data,)
    c.data.num_threads = 1
    c.mesh.num_devices = 1
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _scalars(workdir, tag):
    ea = EventAccumulator(os.path.join(workdir, "tensorboard"))
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)}


def _raw_state(workdir, step):
    """A train-state checkpoint read back as numpy arrays, whatever devices wrote it."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    return checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                                tree))


def test_a_backend_this_machine_lacks_is_refused_before_the_run_makes_its_workdir(tmp_path, data):
    """It was refused while the step traced, after the workdir, its config and its data were made."""
    config = _config(2, data, total_steps=2)
    config.model.attention = "splash"
    with pytest.raises(ValueError, match="attention='splash' does not run on cpu; available there: auto, xla"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_tiny_stage2_loss_falls_steadily_and_metrics_are_written(tmp_path, data, caplog):
    workdir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="unitoken_jax.train.loop"), \
            caplog.at_level(logging.INFO, logger="unitoken_jax.train.checkpoint"):
        train_and_evaluate(_config(2, data, total_steps=30, log_every=5), workdir)
    # each save is said once it has finished (checkpoint_every=20: the routine one at 20, the last at 30)
    saved = re.findall(r"checkpoint of step (\d+) saved in (\S+)", caplog.text)
    assert saved == [("20", os.path.join(workdir, "checkpoints")), ("30", os.path.join(workdir, "checkpoints"))], saved
    # the start of the log says how full whole samples can keep the rows; the batches stay under it
    bound = re.search(r"whole samples can fill at most ([\d.]+)% of a batch's positions \(a row of (\d+) holds at "
                      r"most (\d+) of them", caplog.text)
    assert bound is not None, caplog.text
    # the backend the config's attention took here (nothing said what auto picked)
    assert "attention: xla (auto on cpu), blocks of " in caplog.text, caplog.text
    loss = [v for _, v in sorted(_scalars(workdir, "loss").items())]
    assert len(loss) == 6
    assert loss[-1] < loss[0] - 2.0, loss
    assert sum(b < a for a, b in zip(loss, loss[1:])) >= 4, loss
    ea = EventAccumulator(os.path.join(workdir, "tensorboard"))
    ea.Reload()
    assert {"ce_understanding", "ce_generation", "z_loss", "grad_norm", "learning_rate",
            "tokens_per_second", "real_fraction", "real_tokens"} <= set(ea.Tags()["scalars"])
    assert all(v > 0 for v in _scalars(workdir, "ce_generation").values())
    assert all(0.5 < v <= 1 for v in _scalars(workdir, "real_fraction").values())  # packed rows, little padding
    real = np.mean(list(_scalars(workdir, "real_fraction").values()))
    assert real <= float(bound.group(1)) / 100 + 0.02
    assert int(bound.group(2)) == _config(2, data).data.length
    # the tiny configs' rows hold two ~142-token demo samples (rows of 256 held one: 55.6 % at most),
    # and the batch's picture tiles take both
    assert int(bound.group(3)) == 2 and float(bound.group(1)) > 95 and real > 0.95, (bound.group(0), real)
    assert set(_scalars(workdir, "dropped_too_long").values()) == {0.0}  # logged: no demo sample is over a row
    model = load(os.path.join(workdir, "final"))  # the exported model loads
    assert model.config.decoder.vocab_size == 9216
    # and cuts pictures as its data did: the default rule for a model of its length picks another crop,
    # and a model trained on 32 px crops answered about its own training pictures wrongly at 256
    from unitoken_jax.data.demo import demo_tokenizers
    from unitoken_jax.inference.pipeline import OtherTokenizer, OtherVQGAN, UniTokenPipeline, default_vq_size
    from unitoken_jax.tokenizer.text import TextTokenizer

    _, settings, *_ = pretokenize.open_dataset(data)
    text, vq = demo_tokenizers()
    assert default_vq_size(model.config.decoder.max_position_embeddings, vq) != settings.vq_size
    with warnings.catch_warnings():
        warnings.simplefilter("error", OtherTokenizer)
        warnings.simplefilter("error", OtherVQGAN)
        assert UniTokenPipeline(model, text, vq).vq_size == settings.vq_size
    # asked with another VQ-GAN than its data's (the same config, other weights: other codes): said
    with pytest.warns(OtherVQGAN, match="trained on pictures coded with another VQ-GAN"):
        UniTokenPipeline(model, text, demo_tokenizers(seed=1)[1])
    # asked with another text tokenizer than its data's (the same ids, other words): said
    spec = json.loads(text._full.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    with pytest.warns(OtherTokenizer, match="trained on data pre-tokenized with another text tokenizer"):
        UniTokenPipeline(model, TextTokenizer(json.dumps(spec)), vq)
    # the layout of its data's pictures is inference's default too (AnyRes, continuous features),
    # recorded as the data's settings say; given ones win
    record = os.path.join(workdir, "final", "trained_pictures.json")
    trained = json.load(open(record))
    assert (trained["anyres"], trained["continuous"]) == (settings.anyres, settings.continuous) == (False, True)
    pipe = UniTokenPipeline(model, text, vq)
    assert (pipe.anyres, pipe.continuous) == (False, True)
    json.dump({**trained, "anyres": True, "continuous": False}, open(record, "w"))
    pipe = UniTokenPipeline(model, text, vq)
    assert (pipe.anyres, pipe.continuous) == (True, False)
    pipe = UniTokenPipeline(model, text, vq, anyres=False, continuous=True)
    assert (pipe.anyres, pipe.continuous) == (False, True)
    json.dump(trained, open(record, "w"))
    # the command line takes the demo's tokenizers for it, as pretokenize does (it took 'demo' for a path)
    from PIL import Image

    from unitoken_jax import cli

    Image.new("RGB", (48, 48), "red").save(tmp_path / "red.png")
    assert cli.main(["understand", str(tmp_path / "red.png"), "What colour is it?", "--model",
                     os.path.join(workdir, "final"), "--tokenizer", "demo", "--vqgan", "demo",
                     "--max-new-tokens", "4"]) == 0


def test_under_90_percent_the_log_names_the_row_length_and_the_tiles_that_hold_the_fill_there(data, caplog):
    """Rows of 256 and 8 tiles a batch (the tiny configs until 2026-12-05) hold one ~142-token demo
    sample a row: the start of the log names the length that holds two, and the tiles."""
    from unitoken_jax.train import loop

    config = TrainConfig.from_config_dict(_config(2, data, **{"data.length": 256, "data.max_images": 8}))
    pipeline, _ = loop.input_pipelines(config, "/nonexistent", loop.make_mesh(config.mesh))
    with caplog.at_level(logging.INFO, logger="unitoken_jax.train.loop"):
        loop._log_fill_bound(pipeline, config)
    bound = re.search(r"fill at most ([\d.]+)% .*a row of 256 holds at most 1 of them, the shortest (\d+)", caplog.text)
    assert bound is not None, caplog.text
    shortest = int(bound.group(2))
    records, _, _ = pretokenize.open_dataset(data)
    lengths = [len(records[i]["tokens"]) for i in range(len(records))]
    assert shortest == min(lengths) and abs(float(bound.group(1)) / 100 - np.mean(lengths) / 256) < 0.01
    more = re.search(r"rows of (\d+) positions would hold 2 of the shortest", caplog.text)
    assert more is not None and int(more.group(1)) == 2 * shortest, caplog.text
    tiles = "the batch's 8 picture tiles (data.max_images) take at most 8 samples (1 a sample on average)"
    assert tiles in caplog.text


def test_data_laid_out_for_another_tile_or_patch_than_the_models_vit_is_refused(data, tmp_path):
    """The places of a row's picture features follow the data's SigLIP layout; a ViT of another
    patch makes another number of features a tile, and the gather (which clips) had quietly taken
    other pictures' features. The demo data is now drawn for the model's patch."""
    from unitoken_jax.train import loop

    for key, value, says in (("model.vision.patch_size", 7, "56px SigLIP tiles of 14px patches; the model's ViT takes "
                                                           "56px tiles of 7px patches"),
                             ("model.vision.image_size", 112, "the model's ViT takes 112px tiles of 14px patches")):
        config = TrainConfig.from_config_dict(_config(2, data, **{key: value}))
        with pytest.raises(ValueError, match=says):
            loop.input_pipelines(config, "/nonexistent", loop.make_mesh(config.mesh))
    demo = _config(2, data, **{"model.vision.patch_size": 7, "data.demo": True, "data.sources": ()})
    demo = TrainConfig.from_config_dict(demo)
    pipeline, _ = loop.input_pipelines(demo, str(tmp_path), loop.make_mesh(demo.mesh))
    assert (pipeline.siglip_size, pipeline.patch) == (56, 7) and pipeline.features_per_tile == 64


def _train_command(workdir, data, *extra):
    """The tiny stage 2 from the command line, on the drawn demo data."""
    return [sys.executable, "-m", "unitoken_jax.train", "--config", os.path.join(ROOT, "configs", "stage2.py:tiny"),
            "--workdir", workdir, "--config.data.demo=False", f"--config.data.sources={data}",
            "--config.data.num_threads=1", *extra]


def _one_device(env=None):
    """The environment of a child run: one CPU device (not the tests' 16), compiled as cheaply as here."""
    return dict(os.environ if env is None else env, JAX_PLATFORMS="cpu", XLA_FLAGS=CHEAP_COMPILES)


def _run_cli(workdir, data, *extra, env=None):
    cmd = _train_command(workdir, data, "--config.total_steps=8", "--config.checkpoint_every=100",
                         "--config.log_every=2", *extra)
    return subprocess.run(cmd, cwd=ROOT, env=_one_device(env), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_stop_and_resume_in_a_new_process_is_bit_exact(tmp_path, data):
    interrupted, whole = str(tmp_path / "interrupted"), str(tmp_path / "whole")
    # the interrupted run keeps its compiled programs, and the resumed process loads its step from
    # there: still bit-exact with the run that compiled everything itself
    cache = f"--config.compilation_cache={tmp_path / 'xla'}"
    first = _run_cli(interrupted, data, "--config.stop_after=3", cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert os.listdir(os.path.join(interrupted, "checkpoints")) == ["3"]
    assert not os.path.exists(os.path.join(interrupted, "final"))
    second = _run_cli(interrupted, data, cache, env=dict(os.environ, JAX_DEBUG_LOG_MODULES="jax._src.compiler"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 3" in second.stderr
    assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr, second.stderr[-3000:]
    assert "train step loaded from the compilation cache" in second.stderr
    assert "train step compiled in" in first.stderr
    third = _run_cli(whole, data)
    assert third.returncode == 0, third.stderr[-3000:]

    a, b = _raw_state(interrupted, 8), _raw_state(whole, 8)
    assert int(a["step"]) == 8
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    read = lambda w: [json.loads(line) for line in open(os.path.join(w, "samples.jsonl"))]  # noqa: E731
    assert [r["step"] for r in read(interrupted)] == list(range(8))
    assert read(interrupted) == read(whole)
    # and what was logged: step 4's window, which after the resume had averaged step 4 alone (and counted
    # its tokens alone), takes up step 3, which the stopped run had summed and saved with its checkpoint
    for tag in ("loss", "real_tokens", "real_fraction", "grad_norm"):
        resumed, uninterrupted = _scalars(interrupted, tag), _scalars(whole, tag)
        assert sorted(resumed) == [2, 4, 6, 8] and resumed == uninterrupted, tag


def _start_cli(workdir, data, *extra):
    cmd = _train_command(workdir, data, "--config.checkpoint_every=1000", "--config.log_every=1",
                         "--config.compilation_cache=off", *extra)
    # a session of its own: the signal goes to its process group, as a VM's shutdown reaches every process
    return subprocess.Popen(cmd, cwd=ROOT, env=_one_device(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _read_until(proc, text, seconds):
    """The child's output up to the line that holds `text` (a failure if it ends or takes longer)."""
    import time

    seen, deadline = "", time.time() + seconds
    while text not in seen:
        line = proc.stdout.readline()
        assert line and time.time() < deadline, seen[-3000:]
        seen += line
    return seen


@pytest.mark.slow
def test_sigterm_saves_and_stops_and_the_resumed_run_is_bit_exact_with_worker_processes(tmp_path, data):
    """SIGTERM (a preempted VM: every process of the run gets it, the data's worker processes too)
    makes the run save at the end of the step it is in and stop with exit status 0; the resumed
    run, in a new process, ends where the uninterrupted one does, bit for bit."""
    import signal

    stopped, whole = str(tmp_path / "stopped"), str(tmp_path / "whole")
    run = ("--config.total_steps=200", "--config.stop_after=8", "--config.data.worker_count=1")
    first, other = _start_cli(stopped, data, *run), _start_cli(whole, data, *run)
    seen = _read_until(first, "step 3/200", 400)  # the third step is logged: signal it
    os.killpg(first.pid, signal.SIGTERM)
    seen += first.communicate(timeout=300)[0]
    assert first.returncode == 0, seen[-3000:]
    (saved,) = [int(s) for s in os.listdir(os.path.join(stopped, "checkpoints"))]
    assert 3 <= saved < 8 and f"preempted: saved step {saved}, stopping" in seen, seen[-3000:]
    assert not os.path.exists(os.path.join(stopped, "final"))

    out = other.communicate(timeout=600)[0]
    assert other.returncode == 0, out[-3000:]
    again = _start_cli(stopped, data, *run)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and f"resumed from step {saved}" in out, out[-3000:]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 _raw_state(stopped, 8), _raw_state(whole, 8))


def test_ctrl_c_stops_the_run_with_a_line_and_status_130_not_a_traceback(tmp_path, data):
    """Ctrl-C (SIGINT to the terminal's process group) ended training with a KeyboardInterrupt
    traceback; the README promises every verb a line and exit status 130."""
    import signal

    run = _start_cli(str(tmp_path / "run"), data, "--config.total_steps=200")
    seen = _read_until(run, "compilation cache: off", 300)  # under way (its pipeline, restore, compile next)
    os.killpg(run.pid, signal.SIGINT)
    seen += run.communicate(timeout=300)[0]
    assert run.returncode == 130, seen[-3000:]
    assert "stopped (Ctrl-C)" in seen and "Traceback" not in seen, seen[-3000:]


def test_eight_devices_give_the_loss_of_one(tmp_path, data, monkeypatch):
    """The 8-device step gathers its 4 data-parallel shards' features block by block; the 1-device
    run is fed the same batches (its pipeline packs in the same 4 blocks, which its plain gather
    reads as they are), so the two see the same samples whatever the data's lengths."""
    from unitoken_jax.train import loop

    losses, seen = {}, {}
    for n, mesh in ((1, dict(data=1, fsdp=1, tensor=1)), (8, dict(data=2, fsdp=2, tensor=2))):
        workdir = str(tmp_path / f"d{n}")
        overrides = {f"mesh.{k}": v for k, v in mesh.items()}
        with monkeypatch.context() as m:
            if n == 1:
                m.setattr(loop, "batch_shards", lambda mesh: 4)  # the pipeline's blocks, not the step's
            train_and_evaluate(_config(2, data, total_steps=3, log_every=1, **overrides, **{"mesh.num_devices": n}),
                               workdir)
        losses[n] = _scalars(workdir, "loss")
        seen[n] = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
    assert sorted(losses[1]) == [1, 2, 3]
    assert seen[1] == seen[8] and len(seen[1]) == 3
    for step in losses[1]:
        np.testing.assert_allclose(losses[8][step], losses[1][step], rtol=2e-5)


@pytest.mark.parametrize("data_ways,fsdp,processes", [(1, 8, 1), (2, 4, 2), (1, 2, 4), (1, 4, 6), (2, 2, 1),
                                                      (4, 2, 4), (2, 6, 4)])
def test_each_process_packs_in_blocks_that_stay_inside_one_shard(data, monkeypatch, data_ways, fsdp, processes):
    """The step gathers each data-parallel shard's image features from its own pixels, so a
    process's pipeline must pack in blocks of rows (and tiles) none of which straddles two shards'
    parts of the global batch: the fewest such blocks, found here by trying every count. Processes
    sharing a shard (fewer shards than processes, or shards that do not split evenly among them)
    are refused by name: each read rows of its own, and the global batch came out with fewer rows
    than the step was compiled for, or with copies of one shard that differed."""
    from unitoken_jax.train import loop
    from unitoken_jax.train.program import make_mesh

    shards = data_ways * fsdp
    rows = int(np.lcm(shards, processes)) * 2
    config = TrainConfig.from_config_dict(_config(2, data, **{"data.rows": rows, "data.max_images": rows}))
    mesh = make_mesh(dataclasses.replace(config.mesh, data=data_ways, fsdp=fsdp, tensor=1, num_devices=shards))
    local = rows // processes

    def straddles(blocks, process):
        size = local // blocks
        return any((process * local + k * size) // (rows // shards)
                   != (process * local + (k + 1) * size - 1) // (rows // shards) for k in range(blocks))

    expect = next(b for b in range(1, local + 1) if local % b == 0
                  and not any(straddles(b, p) for p in range(processes)))
    for process in range(processes):
        monkeypatch.setattr(loop.jax, "process_count", lambda: processes)
        monkeypatch.setattr(loop.jax, "process_index", lambda: process)
        if shards % processes:
            with pytest.raises(ValueError, match=f"{shards} data-parallel shards .* over {processes} processes"):
                loop._input_pipeline([data], config, mesh)
            continue
        pipeline = loop._input_pipeline([data], config, mesh)
        assert (pipeline.config.rows, pipeline.config.blocks) == (local, expect)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_together(commands, timeout: int) -> list[str]:
    """Runs the processes of a pod at once and returns their logs. Each writes to a file, not a
    pipe: a pipe read one process after the other filled up (64 KiB) on the process not yet read,
    which then stopped in its write while the other waited for it in a collective (it hung once in
    the clean-clone CI; reproduced under load). A pod that does not finish within `timeout`
    seconds fails with the end of each log (a planted bug's hang must not go on using the cores)."""
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        files = [open(os.path.join(tmp, f"process-{i}.log"), "w+") for i in range(len(commands))]
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=_one_device(), stdout=f, stderr=subprocess.STDOUT, text=True)
                 for cmd, f in zip(commands, files)]
        deadline = time.time() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
        finally:
            for p in procs:  # a hung process's Python stacks first (absl's faulthandler prints them on SIGABRT)
                if p.poll() is None:
                    p.send_signal(signal.SIGABRT)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        logs = []
        for f in files:
            f.seek(0)
            logs.append(f.read())
            f.close()
    if hung:
        pytest.fail(f"the pod did not finish within {timeout} s; its logs end:\n"
                    + "\n".join(f"process {i}:\n{log[-3000:]}" for i, log in enumerate(logs)))
    # every process's log when one fails: the one that failed first is often not the one at fault (a
    # process that waited 300 s at the shutdown barrier for another aborts; the other's stack says why)
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), f"return codes {codes}; the logs end:\n" + "\n".join(
        f"process {i}:\n{log[-4000:]}" for i, log in enumerate(logs))
    return logs


def _pod(workdir, data, caches, *extra):
    """Two processes on gloo train the tiny stage 2 for 4 steps; `caches[i]`: process i's
    compilation cache. Returns their logs."""
    port = _free_port()
    cmd = lambda i: _train_command(  # noqa: E731
        workdir, data, "--config.total_steps=4", "--config.checkpoint_every=2", "--config.log_every=2",
        f"--config.compilation_cache={caches[i]}", f"--coordinator=localhost:{port}", "--num_processes=2",
        f"--process_id={i}", *extra)
    return _run_together([cmd(i) for i in range(2)], timeout=420)  # (alone: ~20 s a pod run)


# evaluation at the last step, with pictures drawn and questions answered by the pod; the held-out
# data is the training data (eval.sources), so training reads the same batches as without it
POD_PROMPTS = ("a red circle at the top left", "a blue square")
POD_QUESTION = "What colour is the shape?"


def _pod_eval(data) -> dict:
    """The pod's `eval` settings beyond its held-out data, as EvalConfig fields."""
    picture = os.path.join(os.path.dirname(data), "pictures", "00000.png")
    return dict(prompts=POD_PROMPTS, questions=((picture, POD_QUESTION),), tokenizer="demo", vqgan="demo", size=64,
                max_new_tokens=6)


def _pod_eval_flags(data):
    return ("--config.eval.every=4", f"--config.eval.sources={data}", "--config.eval.batches=1",
            *(f"--config.eval.{k}={v!r}" if isinstance(v, tuple) else f"--config.eval.{k}={v}"
              for k, v in _pod_eval(data).items()))


@pytest.mark.slow
def test_two_processes_on_gloo_train_and_save_one_checkpoint(tmp_path, data):
    workdir = str(tmp_path / "pod")
    # each process its own compilation cache; only the first process writes to one
    first, second = str(tmp_path / "xla-0"), str(tmp_path / "xla-1")
    outs = _pod(workdir, data, (first, second), *_pod_eval_flags(data))
    assert "over 2 devices in 2 processes" in outs[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    state = _raw_state(workdir, 4)
    assert int(state["step"]) == 4 and int(state["nonfinite_total"]) == 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    # each process counts the real tokens of its own rows; a logged window (2 steps) counts the pod's:
    # more than one process's half of the rows can hold (the rows are packed > 50 % full, as the
    # one-process test shows), at most what all of them hold
    c = _stages().stage_config(2, "tiny").data
    held = 2 * c.rows * c.length
    real = _scalars(workdir, "real_tokens")
    assert sorted(real) == [2, 4] and all(held / 2 < v <= held for v in real.values()), real
    data_state = json.load(open(os.path.join(workdir, "checkpoints", "4", "data", "metadata")))
    assert len(data_state["processes"]) == 2
    assert all(s["packed"] > 0 for s in data_state["processes"])
    # each process records the ids its own rows saw, in its own file: half the rows each, no id in both
    seen = [[json.loads(line) for line in open(os.path.join(workdir, name))]
            for name in ("samples.jsonl", "samples.process1.jsonl")]
    for mine, theirs in zip(*seen):
        assert mine["step"] == theirs["step"] and len(mine["ids"]) == len(theirs["ids"]) == c.rows // 2
        ids = [[i for row in lines["ids"] for i in row] for lines in (mine, theirs)]
        assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])
    assert [line["step"] for line in seen[0]] == [line["step"] for line in seen[1]] == [0, 1, 2, 3]
    final = load(os.path.join(workdir, "final"))
    np.testing.assert_array_equal(np.asarray(final.params["adapter"]["fc1"]["kernel"]),
                                  np.asarray(state["params"]["adapter"]["fc1"]["kernel"]))
    assert any(p.endswith("-cache") for p in os.listdir(first))
    assert not any(p.endswith("-cache") for p in os.listdir(second))

    # the pod's evaluation: the pictures and the answer its processes decoded together (process 0
    # wrote them) are what one process decodes alone from the final parameters
    from unitoken_jax.data import pretokenize as pt
    from unitoken_jax.train import evaluate

    config = TrainConfig.from_config_dict(_stages().stage_config(2, "tiny"))
    eval_config = dataclasses.replace(config.eval, **_pod_eval(data))
    alone = evaluate.Samples(eval_config, config.model, final.params, None, pt.open_dataset(data)[1])
    pictures, answers = alone.run(final.params)
    grid = os.path.join(workdir, "samples", "step_4.png")
    np.testing.assert_array_equal(np.asarray(Image.open(grid).convert("RGB")),
                                  np.asarray(evaluate.captioned_grid(pictures, POD_PROMPTS)))
    said = [f"eval at step 4: {POD_QUESTION!r} -> {answers[0]!r}" in out for out in outs]
    assert said == [True, True], outs[1][-3000:]

    # the last checkpoint damaged where only the second process reads (its shards' files): Orbax's
    # restore ends at a barrier of one name, where that process, falling back to step 2, met the
    # first holding step 4, and the two trained on apart. Both must resume from step 2.
    shards = os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_1", "d")
    assert os.listdir(shards)
    for name in os.listdir(shards):
        os.remove(os.path.join(shards, name))
    # and the first process loads the step, the second compiles it, and the collectives between the
    # two programs still agree: the same weights at step 4 as before, bit for bit
    outs = _pod(workdir, data, (first, second))
    assert "train step loaded from the compilation cache" in outs[0]
    assert "train step compiled in" in outs[1]
    assert all("resumed from step 2" in out for out in outs), outs[0][-3000:]
    assert "process 1 of this pod cannot read it" in outs[0]
    assert "OCDBT database" in outs[1]  # the process that failed says why
    assert not any("read only" in out for out in outs)  # Orbax's notice about the reader of each process
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "4.damaged"]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 _raw_state(workdir, 4), state)


@pytest.mark.slow
def test_a_process_that_fails_alone_stops_the_whole_pod_at_once_saying_why(tmp_path, data):
    """Process 1 fails alone at its third batch (its own data or file system) with one of the
    package's errors: it said it in one line and waited at JAX's shutdown barrier while process 0
    waited for it in the step's collective, until the barrier's 300 s ran out and both aborted
    (-6) with a coordination-service error. Now both end at once, with exit status 1, process 0
    saying which process failed and why."""
    import time

    workdir, port = str(tmp_path / "pod"), _free_port()
    cmd = lambda i: [sys.executable, os.path.join(ROOT, "tests", "pod_fails_alone.py"),  # noqa: E731
                     *_train_command(workdir, data, "--config.total_steps=40", "--config.checkpoint_every=1000",
                                     "--config.log_every=1", "--config.compilation_cache=off",
                                     f"--coordinator=localhost:{port}", "--num_processes=2",
                                     f"--process_id={i}")[3:]]
    files = [open(tmp_path / f"process-{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(cmd(i), cwd=ROOT, env=_one_device(), stdout=f, stderr=subprocess.STDOUT, text=True)
             for i, f in enumerate(files)]
    try:
        ended = [None, None]
        deadline = time.time() + 400
        while None in ended and time.time() < deadline:
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    logs = [open(tmp_path / f"process-{i}.log").read() for i in range(2)]
    said = "unitoken_jax.train: workdir 'gs://bucket/run' is a URL"
    assert [p.returncode for p in procs] == [1, 1], [log[-3000:] for log in logs]
    assert said in logs[1]
    assert f"stopping, as another process of the pod failed: process 1: {said}" in logs[0], logs[0][-3000:]
    assert abs(ended[0] - ended[1]) < 30, ended  # (the barrier's timeout is 300 s; a poll is 1 s)


@pytest.mark.slow
def test_a_sigterm_to_one_process_of_a_pod_stops_every_process_at_one_saved_step(tmp_path, data):
    """A pod's hosts are preempted one by one: the process that gets SIGTERM and the others agree
    (JAX's preemption sync point) on one step, each saves its part of it, and all stop with exit
    status 0 and no final/; how a pod resumes bit-exactly is the test above."""
    import signal
    import threading
    import time

    workdir, port = str(tmp_path / "pod"), _free_port()
    cmd = lambda i: _train_command(  # noqa: E731
        workdir, data, "--config.total_steps=40", "--config.checkpoint_every=1000", "--config.log_every=1",
        "--config.compilation_cache=off", f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}")
    procs = [subprocess.Popen(cmd(i), cwd=ROOT, env=_one_device(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = [[], []]
    def read(i):
        for line in procs[i].stdout:
            logs[i].append(line)

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
    for r in readers:
        r.start()
    try:
        deadline = time.time() + 300
        while not any("step 3/40" in line for line in list(logs[1])):  # the second process logs its third step
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                ["".join(lines)[-3000:] for lines in logs]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for r in readers:
        r.join(timeout=10)
    outs = ["".join(lines) for lines in logs]
    assert codes == [0, 0], [out[-3000:] for out in outs]
    (saved,) = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
    assert 3 <= saved < 40, saved
    assert all(f"preempted: saved step {saved}, stopping" in out for out in outs), [out[-3000:] for out in outs]
    assert not os.path.exists(os.path.join(workdir, "final"))
    data_state = json.load(open(os.path.join(workdir, "checkpoints", str(saved), "data", "metadata")))
    assert len(data_state["processes"]) == 2


def test_a_pods_processes_put_in_the_features_of_their_own_pictures(data):
    """Each process's feature indices are offset to its pixels in the pod's batch and the step gathers
    block by block: in a two-process pod (gloo) the embeddings of every process's rows, and the
    held-out loss, equal what each process computes alone from its own rows (tests/pod_gather.py)."""
    port = _free_port()
    outs = _run_together([[sys.executable, os.path.join(ROOT, "tests", "pod_gather.py"), f"localhost:{port}", str(i),
                           data] for i in range(2)], timeout=300)
    assert all("embeddings apart by at most" in out for out in outs), outs[0][-2000:]  # it compared them


def test_what_the_init_model_brought_besides_its_weights_is_read_at_the_start_and_exported(tmp_path, data):
    """It was read again at the export: an init model moved meanwhile (its stage resumed, exported
    again) gave a final/ without it, and on a pod the run died there, one process failing while the
    others entered Orbax's collective read, without final/."""
    import shutil

    config = _config(2, data, total_steps=2, log_every=2, **{"init_from.kind": "checkpoint",
                                                              "init_from.paths": (str(tmp_path / "start"),)})
    model_config = UniTokenConfig.from_dict(config.model.to_dict())
    start = UniTokenModel(model_config, UniTokenModel.random(model_config, seed=0).params,
                          {"model.vqmodel.quantize.embedding.weight": np.arange(12, dtype=np.float32).reshape(3, 4)},
                          {"model_type": "chameleon", "vq_config": {"embed_dim": 4}}, "bfloat16")
    start.save(str(tmp_path / "start"))

    def moved_away(step, batch):  # once the run has started
        if step == 0:
            shutil.move(str(tmp_path / "start"), str(tmp_path / "start.previous1"))
        return batch
    train_and_evaluate(config, str(tmp_path / "run"), batch_transform=moved_away)
    final = load(str(tmp_path / "run" / "final"))
    np.testing.assert_array_equal(final.passthrough["model.vqmodel.quantize.embedding.weight"],
                                  np.arange(12, dtype=np.float32).reshape(3, 4))
    assert final.hf_config["vq_config"] == {"embed_dim": 4} and final.hf_dtype == "bfloat16"


def test_an_init_model_only_some_processes_of_a_pod_see_is_read_by_none(tmp_path, monkeypatch, caplog):
    """A path on one host's own disk: the other processes' reads of what it holds besides its
    weights failed while that host's read waited for them in Orbax's collective (the pod crashed
    at its start). The processes now count who sees it first; unless all do, none reads it."""
    from unitoken_jax.train.config import InitConfig

    (tmp_path / "start").mkdir()
    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    monkeypatch.setattr(loop.metrics_lib, "sum_over_processes", lambda *v: (1.0,))  # this process sees it, one of 2

    def read(path):
        raise AssertionError("read where not every process sees it")
    monkeypatch.setattr(loop, "read_extras", read)
    with caplog.at_level(logging.WARNING):
        assert loop.init_extras(InitConfig(kind="checkpoint", paths=(str(tmp_path / "start"),))) == \
            ({}, None, "float32")
    assert "is there for 1 of the pod's 2 processes" in caplog.text


def test_stage1_freezes_the_decoder_and_stage2_starts_from_its_vit_and_adapter(tmp_path, data, caplog):
    stage1 = str(tmp_path / "stage1")
    config = _config(1, data, total_steps=3, log_every=3)
    train_and_evaluate(config, stage1)
    model_config = UniTokenConfig.from_dict(config.model.to_dict())
    start = UniTokenModel.random(model_config, seed=0).params
    trained = load(os.path.join(stage1, "final")).params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 trained["decoder"], start["decoder"])
    assert not np.array_equal(np.asarray(trained["adapter"]["fc1"]["kernel"]),
                              np.asarray(start["adapter"]["fc1"]["kernel"]))
    # no optimizer state for the frozen decoder (nor for the ViT's patch / position embeddings)
    opt = _raw_state(stage1, 3)["opt_state"]
    paths = ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(opt)]
    assert not any("decoder" in p or "patch_embedding" in p for p in paths)
    assert any("adapter" in p for p in paths) and any("vit" in p for p in paths)

    c2 = _config(2, data, **{"init_from.kind": "stage", "init_from.paths": (stage1,)})
    params = initial_params(TrainConfig.from_config_dict(c2), mesh=None)
    for part in ("vit", "adapter", "decoder"):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     params[part], trained[part])
    with pytest.raises(FileNotFoundError, match="no finished stage"):
        initial_params(TrainConfig.from_config_dict(
            _config(2, data, **{"init_from.kind": "stage", "init_from.paths": (str(tmp_path),)})), mesh=None)
    # a stage started from a model trained on another VQ-GAN's codes than its data's is said (it trained on,
    # unsaid, and its final/ then recorded only the new VQ-GAN)
    import logging

    record_path = os.path.join(stage1, "final", "trained_pictures.json")
    record = json.load(open(record_path))
    assert isinstance(record["vqgan_sha256"], str)
    json.dump({**record, "vqgan_sha256": "0" * 64}, open(record_path, "w"))
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.train.loop"):
        train_and_evaluate(_config(2, data, total_steps=1, log_every=1,
                                   **{"init_from.kind": "stage", "init_from.paths": (stage1,)}), str(tmp_path / "s2"))
    assert (f"{stage1}/final was trained on data made with another VQ-GAN (sha256 000000000000...) than this run's "
            f"data ({record['vqgan_sha256'][:12]}...)") in caplog.text
    assert "another text tokenizer" not in caplog.text


def test_a_non_finite_streak_stops_the_run_and_checkpoints_stay_finite(tmp_path, data):
    workdir = str(tmp_path / "nan")

    def poison(step, batch):
        if step >= 4:
            batch = dict(batch, pixels=np.full_like(batch["pixels"], np.nan))
        return batch

    config = _config(2, data, total_steps=20, checkpoint_every=2, log_every=100, max_nonfinite_in_a_row=3)
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        train_and_evaluate(config, workdir, batch_transform=poison)
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
    assert steps == [2, 4, 6]
    at4, at6 = _raw_state(workdir, 4), _raw_state(workdir, 6)
    assert int(at6["nonfinite_total"]) == 2 and int(at4["nonfinite_total"]) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (at4["params"], at4["opt_state"]), (at6["params"], at6["opt_state"]))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(at6["params"]))
    # a streak before the first checkpoint says so (it said "the latest is step None")
    config = _config(2, data, total_steps=20, checkpoint_every=100, log_every=100, max_nonfinite_in_a_row=2)
    with pytest.raises(TrainingDiverged, match="none was written yet"):
        train_and_evaluate(config, str(tmp_path / "early"), batch_transform=lambda step, b: poison(step + 4, b))


def test_a_finished_run_resumed_to_go_further_sets_its_old_final_aside_and_says_what_skipped_steps_cost(
        tmp_path, data, caplog):
    """Raising total_steps of a finished run left the old final/ in place while the run went on:
    a sweep called the run finished and the next stage's init_from read the old model. And a run
    whose skipped (non-finite) steps left it with fewer updates ended without a word."""
    import logging

    workdir = str(tmp_path / "run")
    train_and_evaluate(_config(2, data, total_steps=2, log_every=100), workdir)
    assert os.path.isdir(os.path.join(workdir, "final"))

    def poison(step, batch):  # one non-finite step of the four
        return dict(batch, pixels=np.full_like(batch["pixels"], np.nan)) if step == 2 else batch

    with caplog.at_level(logging.WARNING, logger="unitoken_jax.train.loop"):
        train_and_evaluate(_config(2, data, total_steps=4, log_every=100, stop_after=3), workdir,
                           batch_transform=poison)
    assert not os.path.exists(os.path.join(workdir, "final"))
    assert os.path.isdir(os.path.join(workdir, "final.previous1"))
    assert "kept as final.previous1" in caplog.text
    # a stop_after the run has passed was ignored: the run trained to its end
    record = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(ValueError, match="stop_after=2, but the run resumes after step 3"):
        train_and_evaluate(_config(2, data, total_steps=4, log_every=100, stop_after=2), workdir)
    # the refused run left the record of what the checkpoints were trained with as it was
    assert open(os.path.join(workdir, "config.json")).read() == record
    # a total_steps below the step reached: the mid-schedule model was exported as a finished shorter run
    with pytest.raises(ValueError, match="is at step 3, past total_steps=2: give total_steps=3 or more"):
        train_and_evaluate(_config(2, data, total_steps=2, log_every=100), workdir)
    assert not os.path.exists(os.path.join(workdir, "final"))
    # a second run on a workdir in use (it resumed from the same checkpoint, saved over the first's and
    # exported over its final/, unsaid) is refused, naming the run holding it; refused and finished runs free it
    from unitoken_jax.train import loop

    other = loop._WorkdirLock()
    other.take(workdir)
    try:
        with pytest.raises(ValueError, match=rf"run is in use by another training run \(process {os.getpid()} on "):
            train_and_evaluate(_config(2, data, total_steps=4, log_every=100), workdir)
    finally:
        other.release()
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.train.loop"):
        train_and_evaluate(_config(2, data, total_steps=4, log_every=100), workdir)
    assert os.path.isdir(os.path.join(workdir, "final"))
    assert "1 of the 4 steps were skipped (non-finite loss or gradient), so the model had 3 updates" in caplog.text
    free = loop._WorkdirLock()
    free.take(workdir)  # (the finished run let it go)
    free.release()


def test_a_workdir_holding_another_stages_checkpoints_is_refused(tmp_path, data):
    """Stage 3 pointed at stage 2's finished workdir resumed from its last step, trained nothing,
    and exported stage 2's model as its own final/."""
    workdir = tmp_path / "stage2"
    (workdir / "checkpoints" / "40").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(_config(2, data).to_dict()))
    with pytest.raises(ValueError, match="holds the checkpoints of a stage-2 run .* this run is stage 3"):
        train_and_evaluate(_config(3, data), str(workdir))


def test_a_sigterm_while_the_run_starts_stops_it_before_its_first_step(tmp_path, data, monkeypatch, caplog):
    """The SIGTERM handler came only with the first step: a preemption (or a sweep's Ctrl-C) while
    the run built its step and pipeline, restored and compiled killed it as a failure."""
    import signal

    from unitoken_jax.train import loop

    real = loop.build_program

    def preempted_while_building(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "build_program", preempted_while_building)
    workdir = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="unitoken_jax"):
        assert train_and_evaluate(_config(2, data, total_steps=2), str(workdir)) == {}
    assert not (workdir / "checkpoints").exists() and not (workdir / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # put back
    # stopped when its data pipeline was built, before the rest (a state's init and restore, the compile)
    assert "preempted before the first step (SIGTERM while the data pipeline was built)" in caplog.text


def test_a_sigterm_while_the_step_compiles_stops_the_run_without_waiting_for_the_compile(tmp_path, data, monkeypatch,
                                                                                       caplog):
    """XLA holds the thread that compiles, and Python runs a signal's handler only when it returns:
    a SIGTERM (or Ctrl-C) during the step's compile, minutes for the 7B, waited for all of it. Here
    the compile never ends unless let go: the run must stop without it."""
    import signal
    import threading

    from unitoken_jax.train import program

    let_go, waited = threading.Event(), []

    class Lowered:
        def compile(self):
            os.kill(os.getpid(), signal.SIGTERM)
            waited.append(let_go.wait(60))  # (False: 60 s passed and the run had waited them all)
            raise RuntimeError("a compile the run should not have waited for")

    monkeypatch.setattr(program.TrainProgram, "lower", lambda self: Lowered())
    workdir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="unitoken_jax"):
        assert train_and_evaluate(_config(2, data, total_steps=2), str(workdir)) == {}
    assert waited == [], waited  # still compiling when the run returned
    let_go.set()
    assert "preempted before the first step (SIGTERM while the step compiled)" in caplog.text, caplog.text
    assert not os.listdir(workdir / "checkpoints") and not (workdir / "final").exists()


def test_a_url_workdir_is_refused_before_anything_is_written(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="Cloud Storage FUSE"):
        train_and_evaluate(_config(2, data, total_steps=1), "gs://bucket/run")
    assert not os.path.exists(tmp_path / "gs:")  # no local stand-in directory either


def test_a_workdir_that_is_a_file_and_pod_flags_without_a_coordinator_are_refused_in_one_line(tmp_path, data):
    """A file as --workdir ended in os.makedirs' FileExistsError traceback; --num_processes and
    --process_id without --coordinator were ignored, unsaid: each "process" of a would-be pod
    trained alone, into the same workdir."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="workdir .*afile' is a file: give a directory"):
        train_and_evaluate(_config(2, data, total_steps=1), str(tmp_path / "afile"))
    r = _run_cli(str(tmp_path / "run"), data, "--num_processes=2", "--process_id=1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--num_processes and --process_id act only with --coordinator (or --distributed)" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_mesh_that_does_not_split_the_weights_is_refused_naming_the_weight(data):
    """tensor=8 over the tiny model's 4 heads: JAX's IndivisibleError at the first compile named a
    sharding and a shape, neither the weight nor the setting; the inference CLI's --mesh already
    said which weight does not split (`fit.uneven_split`)."""
    from unitoken_jax.train.program import build_program, make_mesh

    config = TrainConfig.from_config_dict(_config(2, data, **{"mesh.num_devices": 8, "mesh.fsdp": 1,
                                                              "mesh.tensor": 8}))
    with pytest.raises(ValueError, match=r"does not split the model's weights evenly: decoder/layers/self_attn/"
                                         r"\w+/kernel .*set mesh.data / mesh.fsdp / mesh.tensor"):
        build_program(config, make_mesh(config.mesh))


def test_a_torn_samples_log_line_does_not_block_the_resume(tmp_path, caplog):
    """A kill mid-write leaves a torn last line in samples.jsonl; resuming raised JSONDecodeError
    (issue 15). The damaged line is dropped with a warning; the complete ones the checkpoint covers stay."""
    import logging

    from unitoken_jax.train.loop import _SamplesLog

    path = tmp_path / "samples.jsonl"
    lines = [json.dumps({"step": s, "ids": [[f"s{s}"]]}) + "\n" for s in range(1, 5)]
    path.write_text("".join(lines) + '{"step": 5, "ids": [["s')
    with caplog.at_level(logging.WARNING):
        _SamplesLog(str(tmp_path), start_step=4, enabled=True)
    assert path.read_text() == "".join(lines[:3])
    assert "line 5 is damaged" in caplog.text


def test_train_help_shows_the_flags(capsys):
    from unitoken_jax import cli

    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--workdir" in out and "--config.KEY=VALUE" in out and "absl_flags" not in out


def test_library_info_lines_are_dropped_from_the_training_log():
    """About a hundred Orbax / TFDS INFO lines a run buried the training log (issue 15)."""
    import logging

    from unitoken_jax.train.__main__ import _QuietLibraries

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    quiet = _QuietLibraries()
    assert not quiet.filter(record("/site-packages/orbax/checkpoint/manager.py", logging.INFO))
    assert not quiet.filter(record("/site-packages/tensorflow_datasets/core/dataset_info.py", logging.INFO))
    assert quiet.filter(record("/site-packages/orbax/checkpoint/manager.py", logging.WARNING))
    assert quiet.filter(record("/work/unitoken_jax/train/loop.py", logging.INFO))


def test_the_training_log_says_how_far_the_run_is_and_the_time_left(caplog):
    """Each logged window names the step out of the total and the time the remaining steps take
    at the window's rate: 5 steps in 10 s, 30 to go -> 60 s."""
    import logging

    from unitoken_jax.train import metrics as metrics_lib

    import time

    window = metrics_lib.Window()
    window.start = time.time() - 10.0  # the window began 10 s ago
    for rate in range(5):
        window.add_metrics({"loss": np.float32(2.0), "learning_rate": np.float32(rate)})
    with caplog.at_level(logging.INFO, logger=metrics_lib.log.name):
        out = window.flush(10, flops=None, devices=1, total=40)
    assert out["loss"] == 2.0
    assert out["learning_rate"] == 4.0  # the rate at the logged step (the window's mean lagged in warm-up)
    assert "step 10/40 (25%, 0:01:00 left): learning_rate=4 loss=2" in caplog.text

    # a split with no tokens in the window (stage I's generation) is left out, not logged as NaN
    for tokens in (10.0, 30.0):
        window.add_metrics({"loss": np.float32(1.0), "ce_understanding": np.float32(tokens / 10),
                            "tokens_understanding": np.float32(tokens), "ce_generation": np.float32(0.0),
                            "tokens_generation": np.float32(0.0)})
    out = window.flush(12, flops=None, devices=1)
    assert out["ce_understanding"] == pytest.approx((1.0 * 10 + 3.0 * 30) / 40) and "ce_generation" not in out

    # a skipped (non-finite) step's NaN loss had made the window's loss NaN; the steps that counted
    # give it (a window of skipped steps only still shows the NaN)
    for loss, skipped in ((1.0, 0), (np.nan, 1), (3.0, 0)):
        window.add_metrics({"loss": np.float32(loss), "skipped": np.int32(skipped)})
    out = window.flush(13, flops=None, devices=1)
    assert out["loss"] == 2.0 and out["skipped"] == 1
    # ... and the split losses, weighted by their tokens, which a skipped step counted too
    for ce, skipped in ((1.0, 0), (np.nan, 1), (3.0, 0)):
        window.add_metrics({"ce_understanding": np.float32(ce), "tokens_understanding": np.float32(10),
                            "skipped": np.int32(skipped)})
    assert window.flush(13, flops=None, devices=1)["ce_understanding"] == 2.0
    window.add_metrics({"loss": np.float32(np.nan), "skipped": np.int32(1)})
    assert np.isnan(window.flush(14, flops=None, devices=1)["loss"])

    # accumulating: grad_norm is the completed updates' (the partial means between are not), and a
    # window in which no update completed logs none; the micro-batches' own norms average over all
    def micro(grad_norm, micro_norm, updates):
        return {"grad_norm": np.float32(grad_norm), "micro_batch_grad_norm": np.float32(micro_norm),
                "updates": np.int32(updates)}

    for m in (micro(9.0, 9.0, 0), micro(2.0, 5.0, 1), micro(7.0, 7.0, 0), micro(4.0, 3.0, 1)):
        window.add_metrics(m)
    out = window.flush(16, flops=None, devices=1)
    assert out["grad_norm"] == pytest.approx(3.0) and out["updates"] == 2
    assert out["micro_batch_grad_norm"] == pytest.approx(6.0)
    for m in (micro(np.nan, np.nan, 0), micro(2.0, 5.0, 1)):  # a skipped micro-batch, then an update
        window.add_metrics(m)
    assert window.flush(18, flops=None, devices=1)["grad_norm"] == pytest.approx(2.0)
    window.add_metrics(micro(9.0, 9.0, 0))
    out = window.flush(19, flops=None, devices=1)
    assert "grad_norm" not in out and out["updates"] == 0


def test_a_run_resumed_with_another_config_keeps_the_old_one_and_says_what_changed(tmp_path, caplog):
    """config.json was overwritten without a word: a resumed run with other rows, seed or learning
    rate lost the record of what its checkpoints were trained with."""
    import logging

    from unitoken_jax.train.loop import record_config

    first = _stages().stage_config(2, "tiny").to_dict()
    record_config(str(tmp_path), first)
    record_config(str(tmp_path), first)  # the same again: nothing to say
    assert not caplog.records and not (tmp_path / "config.previous1.json").exists()
    second = _stages().stage_config(2, "tiny")
    second.data.rows, second.total_steps = 4, 80
    with caplog.at_level(logging.WARNING):
        record_config(str(tmp_path), second.to_dict())
    assert "kept as config.previous1.json): data.rows: 8 -> 4; total_steps: 40 -> 80" in caplog.text
    assert json.loads((tmp_path / "config.previous1.json").read_text())["data"]["rows"] == 8
    assert json.loads((tmp_path / "config.json").read_text())["data"]["rows"] == 4


def test_a_resume_on_changed_data_is_refused_naming_the_change_or_starts_the_order_anew(tmp_path, data, caplog):
    """The saved read positions were applied to whatever data the resumed config gave (a dataset
    added or removed, a ratio, more records, another data.seed or mix): the run went on at the old
    positions of a new order, training some samples twice and skipping others, with no word (and a
    mix that turned a kind on failed in Grain with a TypeError)."""
    more = build_demo_dataset(str(tmp_path / "more"), n=32)
    workdir = str(tmp_path / "run")
    train_and_evaluate(_config(2, data, total_steps=4, stop_after=2, log_every=1), workdir)
    for overrides, said in [({"data.sources": (data, more)}, "1 dataset(s), now 2"),
                            ({"data.seed": 1}, "data.seed 0 -> 1"),
                            ({"data.mix": (1, 0)}, "data.mix [1, 1] -> [1, 0]"),
                            ({"data.sources": (more,)}, "dataset 1 (" + more + "): understanding ")]:
        with pytest.raises(ValueError, match="the data changed since the checkpoint at step 2") as refused:
            train_and_evaluate(_config(2, data, total_steps=4, log_every=1, **overrides), workdir)
        assert said in str(refused.value) and "--config.data.new_order=True" in str(refused.value), overrides
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]  # nothing trained on
    # the same data again resumes as before; asked for, a changed one starts its order anew
    # (a held-out split added with the new order holds samples trained on before: said, it was not)
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(_config(2, data, total_steps=4, log_every=1, **{
            "data.seed": 1, "data.new_order": True, "eval.holdout_fraction": 0.25}), workdir)
    assert "the sample order starts anew (data.new_order)" in caplog.text and "data.seed 0 -> 1" in caplog.text
    assert "the held-out split changed with it, so samples trained on before this step may now be held out" \
        in caplog.text
    assert os.path.isdir(os.path.join(workdir, "final"))
    # a dataset listed twice (its weight doubled, unsaid) and evaluation sources that are trained on
    # (an evaluation of trained samples called held out, unsaid) are said
    from unitoken_jax.train.config import TrainConfig
    from unitoken_jax.train.loop import _training_sources

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _training_sources(TrainConfig.from_config_dict(_config(2, data, **{
            "data.sources": (data, data + "/", more), "eval.sources": (more,), "eval.every": 2})), workdir)
    assert f"data.sources lists {os.path.realpath(data)} more than once" in caplog.text, caplog.text
    assert f"eval.sources names {os.path.realpath(more)}, which data.sources trains on too" in caplog.text


def test_the_final_export_is_whole_or_absent(tmp_path):
    """final/ was written in place: a run killed during the export left a final/ that sweeps and the
    next stage took for a finished stage, and that did not load."""
    from unitoken_jax.train.loop import export_final

    class Dies:
        def save(self, path):
            os.makedirs(os.path.join(path, "params"))
            raise KeyboardInterrupt("killed during the export")

    class Saves:
        def save(self, path):
            os.makedirs(path)
            with open(os.path.join(path, "config.json"), "w") as f:
                f.write("{}")

    final = str(tmp_path / "final")
    with pytest.raises(KeyboardInterrupt):
        export_final(Dies(), final)
    assert not os.path.exists(final)
    export_final(Saves(), final)  # a rerun: the leftover partial export is replaced
    assert sorted(os.listdir(tmp_path)) == ["final"] and os.listdir(final) == ["config.json"]
    export_final(Saves(), final)  # exporting a finished run again replaces it whole
    assert sorted(os.listdir(tmp_path)) == ["final"]


def test_a_stage_start_names_the_previous_stages_final_model():
    """A LoRA run from a stage named the stage's workdir as its adapters' base_model_name_or_path,
    where the model is WORKDIR/final."""
    from unitoken_jax.train.config import InitConfig
    from unitoken_jax.train.loop import init_model_paths

    assert init_model_paths(InitConfig(kind="stage", paths=("/w/stage1",))) == ["/w/stage1/final"]
    assert init_model_paths(InitConfig(kind="checkpoint", paths=("/ckpt/a", "/ckpt/b"))) == ["/ckpt/a", "/ckpt/b"]


def test_a_batch_not_packed_in_the_steps_blocks_is_refused():
    """The step gathers each block's image features from its own share of the pixels, where an
    index outside it would silently read a wrong feature: the loop refuses such a batch."""
    from unitoken_jax.train import loop

    cont = np.zeros((2, 6), bool)
    cont[1, 1:3] = True
    index = np.zeros((2, 6), np.int32)
    index[1, 1:3] = [3, 4]  # row 1 (block 1: features 4-7) reads feature 3, block 0's
    with pytest.raises(ValueError, match="row 1 of this process's batch uses image features outside its block"):
        loop._global_batch({"is_continuous": cont, "feature_index": index}, None, 8, 2)


def test_demo_data_beside_a_user_s_sources_is_said(tmp_path, data, caplog):
    """The tiny configs keep data.demo=True: `--config.data.sources=mine` on one trained on the
    demo data too, and nothing said so."""
    import logging

    from unitoken_jax.train import loop

    config = TrainConfig.from_config_dict(_config(2, data, **{"data.demo": True}))
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.train.loop"):
        sources = loop._training_sources(config, str(tmp_path))
    assert len(sources) == 2 and "--config.data.demo=False trains on yours alone" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.train.loop"):
        alone = loop._training_sources(TrainConfig.from_config_dict(_config(2, data)), str(tmp_path))
    assert [s.path for s in alone] == [data]
    assert not caplog.text


def test_ctrl_c_in_a_training_called_from_python_leaves_the_caller_running(tmp_path, monkeypatch, capsys):
    """The `unitoken` command ends at once on Ctrl-C (no interpreter teardown to crash in); a call
    of `cli.main(["train", ...])` from Python (a notebook, a script) gets SystemExit(130) instead of
    losing its interpreter."""
    from unitoken_jax import cli
    from unitoken_jax.train import __main__ as train_main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_main, "train_and_evaluate", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--config", os.path.join(ROOT, "configs", "stage2.py:tiny"), "--workdir",
                  str(tmp_path / "run")])
    assert stop.value.code == 130 and "stopped (Ctrl-C)" in capsys.readouterr().err


def test_the_flop_count_takes_the_lm_head_where_a_token_is_predicted(caplog):
    """The MFU's analytic count had charged the LM head at every real token, though the step runs
    it only where a token is predicted (`fused_lm_loss`): the tiny config's count read ~29 % high.
    Hand count: 6 x parameters x tokens + 12 x layers x hidden x context x tokens, less the head's
    6 x hidden x vocab at each real position that predicts nothing."""
    import logging

    from unitoken_jax.models.config import UniTokenConfig
    from unitoken_jax.models.unitoken import abstract_params
    from unitoken_jax.train import metrics as metrics_lib
    from unitoken_jax.train.optimizer import trainable_mask

    config = UniTokenConfig.from_dict(stages.stage_config(2, "tiny").model.to_dict())
    params = abstract_params(config)
    counter = metrics_lib.FlopCounter(config, params, trainable_mask(params, "all"))
    # row 0: two samples then padding; position t predicts the label at t + 1 of its own sample
    seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1] * 8])
    labels = np.array([[-100, -100, 5, -100, 7, -100, 9, -100], [-100, 1, 2, 3, -100, -100, -100, -100]])
    predicting = 2 + 3  # row 0: t = 1, 3 (t = 5 is padding); row 1: t = 0, 1, 2
    positions = np.array([[0, 1, 2, 0, 1, 0, 0, 0], list(range(8))])
    batch = dict(segment_ids=seg, labels=labels, positions=positions, pixels=np.zeros((0, 8, 8, 3), np.float32))
    window = metrics_lib.Window()
    window.add_batch(batch, features_per_tile=16)
    tokens, context = 13, (0 + 1 + 2 + 0 + 1 + sum(range(8))) / 13 + 1
    assert window.flop_inputs == [(tokens, pytest.approx(context), 0, predicting)]
    d = config.decoder
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["decoder"]))
    expected = 6 * n * tokens + 12 * d.num_layers * d.hidden_size * context * tokens \
        - 6 * d.hidden_size * d.vocab_size * (tokens - predicting)
    assert counter.per_step(*window.flop_inputs[0]) == pytest.approx(expected, rel=1e-12)
    assert counter.per_step(tokens, context, 0) == pytest.approx(expected + 6 * d.hidden_size * d.vocab_size * 8)
    # the loss's own count is of the predicted tokens: named so in the log, not a bare "tokens"
    window.add_metrics({"loss": np.float32(2.0), "tokens": np.float32(predicting)})
    with caplog.at_level(logging.INFO, logger=metrics_lib.log.name):
        window.flush(1, counter, devices=1)
    assert "predicted=5 " in caplog.text and " tokens=" not in caplog.text


def test_checkpoints_that_cannot_be_saved_stop_the_run_at_once_and_are_never_said_saved(tmp_path, data, monkeypatch):
    """A checkpoints/ that is a file, or a place that refuses writes, trained on until the first
    save failed; a save that failed in the background (the storage full) was noticed only at the
    next save, `checkpoint_every` steps later, and `stop_after` said "saved step N" of a save that
    then failed. Now: refused before any step; the run stops the step after the failed save; and
    "saved" comes only after the save finished."""
    import errno
    import time

    from unitoken_jax.convert.files import CheckpointError
    from unitoken_jax.train import checkpoint as ckpt_lib

    trained = []

    def record(step, batch):
        trained.append(step)
        if step == 4:  # just after the save at step 4 began: time for it to fail in the background
            time.sleep(1.0)
        return batch

    workdir = tmp_path / "file"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a directory")
    with pytest.raises(ValueError, match="checkpoints is a file: the checkpoints go in a directory"):
        train_and_evaluate(_config(2, data, total_steps=4, log_every=100), str(workdir), batch_transform=record)
    assert not trained
    with pytest.raises(ValueError, match="checkpoints cannot be written in /proc/unitoken-none/checkpoints: "):
        ckpt_lib.Checkpointer("/proc/unitoken-none/checkpoints")  # a file system that refuses a new directory

    class Full:  # a storage write that fails as a full disk's does
        def result(self, timeout=None):
            raise OSError(errno.ENOSPC, "No space left on device")

    save = ocp.StandardCheckpointHandler.async_save

    async def failing_save(self, directory, *args, **kwargs):  # writes, then one write fails
        return [*(await save(self, directory, *args, **kwargs) or []), Full()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_save)
    with pytest.raises(CheckpointError, match=r"could not be saved in .*full.*No space left on device"):
        train_and_evaluate(_config(2, data, total_steps=8, checkpoint_every=4, log_every=100), str(tmp_path / "full"),
                           batch_transform=record)
    assert 4 <= max(trained) <= 5, trained  # not on to the next save's step 8
    trained.clear()
    logs = []
    monkeypatch.setattr(loop.log, "warning", lambda msg, *a: logs.append(msg % a))
    with pytest.raises(CheckpointError, match="No space left on device"):
        train_and_evaluate(_config(2, data, total_steps=8, stop_after=2, log_every=100), str(tmp_path / "stop"),
                           batch_transform=record)
    assert not [m for m in logs if "saved step" in m], logs


def test_data_past_the_vocabulary_is_named_and_unused_eval_keys_are_said(tmp_path, data, caplog):
    """A vocab_size below the data's tokenizer made every step non-finite, ending in "lower the
    learning rate" (or, with the default streak, a run that "finished" without an update); eval keys
    with eval.every=0 were passed over unsaid."""
    config = _config(2, data, total_steps=2, log_every=100, **{
        "model.decoder.vocab_size": 100, "eval.prompts": ("a red circle",), "eval.tokenizer": "demo",
        "eval.vqgan": "demo"})
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.train.loop"):
        with pytest.raises(ValueError, match=r"the data holds token id \d+, past model.decoder.vocab_size=100"):
            train_and_evaluate(config, str(tmp_path / "run"))
    assert "eval.prompts, eval.tokenizer, eval.vqgan set, but eval.every=0: nothing is evaluated" in caplog.text
