"""Evaluation during training (issue 16, config.eval) on the tiny stage-II config and the drawn
demo data: the held-out split by sample id keeps evaluation's samples out of training; held-out
losses, drawn pictures and answers reach TensorBoard and WORKDIR/samples/step_N.png; the held-out
loss is the model's cross-entropy on those samples; a run trains the same with evaluation as
without; bad eval settings are errors that name the key; the sweep summary shows the eval losses."""

import io
import json
import logging
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from unitoken_jax import sweep as sweep_lib
from unitoken_jax.configs import stages
from unitoken_jax.data import pretokenize as pt
from unitoken_jax.data.demo import build_demo_dataset
from unitoken_jax.data.pipeline import InputPipeline, PipelineConfig, is_held_out
from unitoken_jax.model import load
from unitoken_jax.train import evaluate
from unitoken_jax.train.config import EvalConfig, TrainConfig
from unitoken_jax.train.loop import input_pipelines, train_and_evaluate
from unitoken_jax.train.program import make_mesh

FRACTION = 0.25
STEPS, EVERY = 4, 2
PROMPTS = ("a red circle at the top left", "a blue square at the bottom right")
SIZE = 128  # the layout's pixels: 4 grid units = 8 x 8 codes = 32 px from the demo VQ-GAN (4x downsampling)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_demo_dataset(str(tmp_path_factory.mktemp("demo")), n=96)


def _config(data, **eval_overrides):
    c = stages.stage_config(2, "tiny")
    c.data.demo = False
    c.data.sources = (data,)
    c.data.num_threads = 1
    c.mesh.num_devices = 1
    c.total_steps = STEPS
    c.log_every = 2
    c.checkpoint_every = 100
    c.eval = ml_collections.ConfigDict({**dict(every=EVERY, holdout_fraction=FRACTION, batches=2), **eval_overrides})
    return c


def _with_samples(data):
    picture = os.path.join(os.path.dirname(data), "pictures", "00000.png")
    return _config(data, prompts=PROMPTS, questions=((picture, "What is in the picture?"), ("", "Say something.")),
                   tokenizer="demo", vqgan="demo", size=SIZE, max_new_tokens=8)


@pytest.fixture(scope="module")
def evaluated(data, tmp_path_factory):
    """A 4-step run evaluating at steps 2 and 4, with two prompts and two questions."""
    workdir = str(tmp_path_factory.mktemp("evaluated") / "run")
    result = train_and_evaluate(_with_samples(data), workdir)
    return workdir, result


def _events(workdir):
    ea = EventAccumulator(os.path.join(workdir, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _scalars(ea, tag):
    return {e.step: e.value for e in ea.Scalars(tag)}


def _held_out_batches(config, workdir, n):
    train_config = TrainConfig.from_config_dict(config)
    _, held_out = input_pipelines(train_config, workdir, make_mesh(train_config.mesh))
    it = held_out.iterator()
    return [next(it) for _ in range(n)]


def _ids(batch):
    return {i for row in batch["sample_ids"] for i in row}


# --- the held-out split ------------------------------------------------------------------------
def test_the_held_out_split_by_sample_id_is_fixed():
    """The split must not move between versions, hosts or runs: a resumed run would train on
    samples its evaluation measured. (Golden values of the BLAKE2b rule.)"""
    assert [i for i in range(40) if is_held_out(f"demo-{i}", FRACTION)] == [1, 10, 11, 12, 16, 21, 24, 25, 34, 35,
                                                                             38, 39]
    assert not any(is_held_out(f"demo-{i}", 0.0) for i in range(40))
    assert all(is_held_out(f"demo-{i}", 1.0) for i in range(40))


def test_evaluation_never_sees_a_training_sample(data, evaluated):
    workdir, _ = evaluated
    source, _, _ = pt.open_dataset(data)
    every_id = {source[i]["id"].decode() for i in range(len(source))}
    held = {i for i in every_id if is_held_out(i, FRACTION)}
    assert 0 < len(held) < len(every_id) / 2

    with open(os.path.join(workdir, "samples.jsonl")) as f:
        trained = {i for line in f for row in json.loads(line)["ids"] for i in row}
    batches = _held_out_batches(_with_samples(data), workdir, 8)  # the loop's held-out pipeline, well past its 2
    evaluated_ids = set().union(*map(_ids, batches))
    assert len(trained) > 20 and len(evaluated_ids) > 10
    assert not trained & held, sorted(trained & held)
    assert evaluated_ids <= held, sorted(evaluated_ids - held)
    assert not trained & evaluated_ids
    assert {k for b in batches for k in b["kinds"]} == {"understanding", "generation"}


def test_held_out_datasets_of_their_own_are_read_whole_and_training_reads_everything(data, tmp_path):
    config = _config(data)
    config.eval.holdout_fraction = 0.0
    config.eval.sources = (data,)
    train_config = TrainConfig.from_config_dict(config)
    train, held_out = input_pipelines(train_config, str(tmp_path), make_mesh(train_config.mesh))
    assert (train.config.holdout_fraction, held_out.config.holdout_fraction) == (0.0, 1.0)
    it, ev = train.iterator(), held_out.iterator()
    trained = set().union(*(_ids(next(it)) for _ in range(6)))
    evaluated_ids = set().union(*(_ids(next(ev)) for _ in range(6)))
    assert any(is_held_out(i, FRACTION) for i in trained) and any(not is_held_out(i, FRACTION) for i in evaluated_ids)


def test_a_split_with_no_sample_is_an_error_not_an_endless_read(data):
    pipeline = InputPipeline([data], PipelineConfig(rows=4, length=256, max_images=4, num_threads=1,
                                                    holdout_fraction=1e-12, split="eval"))
    with pytest.raises(ValueError, match="no understanding sample is in the 'eval' split"):
        next(iter(pipeline))
    for wrong, match in ((dict(split="test"), "split='test'"), (dict(split="eval"), "holds out nothing"),
                         (dict(holdout_fraction=1.5), r"holdout_fraction=1.5 must be in \[0, 1\]")):
        with pytest.raises(ValueError, match=match):
            PipelineConfig(rows=4, length=256, **wrong).validate()


# --- what an evaluation writes ---------------------------------------------------------------
def test_eval_losses_pictures_and_answers_are_written(data, evaluated):
    workdir, result = evaluated
    ea = _events(workdir)
    losses = {tag: _scalars(ea, tag) for tag in ("eval/loss", "eval/ce", "eval/ce_understanding",
                                                 "eval/ce_generation", "eval/tokens")}
    assert all(sorted(v) == [2, 4] for v in losses.values()), losses
    assert all(np.isfinite(v) and v > 0 for by_step in losses.values() for v in by_step.values())
    assert losses["eval/loss"][4] != losses["eval/loss"][2]  # measured on the parameters of each step
    assert result["eval/loss"] == pytest.approx(losses["eval/loss"][4])

    tensors = set(ea.Tags()["tensors"])
    assert {"eval/pictures/0", "eval/pictures/1", "eval/answers/0", "eval/answers/1"} <= tensors
    assert ea.SummaryMetadata("eval/pictures/0").plugin_data.plugin_name == "images"
    assert ea.SummaryMetadata("eval/pictures/1").summary_description == PROMPTS[1]
    assert ea.SummaryMetadata("eval/answers/0").plugin_data.plugin_name == "text"
    answer = ea.Tensors("eval/answers/1")[-1].tensor_proto.string_val[0].decode()
    assert "**question** Say something." in answer and "**answer**" in answer

    pictures = {}
    for i in range(len(PROMPTS)):
        events = ea.Tensors(f"eval/pictures/{i}")
        assert [e.step for e in events] == [2, 4]
        width, height, png = events[-1].tensor_proto.string_val
        picture = Image.open(io.BytesIO(png))
        assert picture.size == (int(width), int(height)) == (32, 32)
        pictures[i] = picture.convert("RGB")

    assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_2.png", "step_4.png"]
    grid = Image.open(os.path.join(workdir, "samples", "step_4.png"))
    grid.load()
    side = evaluate.MIN_SIDE
    assert grid.size == (2 * side + evaluate.GAP, side + evaluate.CAPTION_HEIGHT) == (260, 168)
    for i, picture in pictures.items():  # the grid shows step 4's pictures, scaled up
        x = i * (side + evaluate.GAP)
        np.testing.assert_array_equal(np.asarray(grid.convert("RGB").crop((x, 0, x + side, side))),
                                      np.asarray(picture.resize((side, side), Image.NEAREST)))
    caption = np.asarray(grid.convert("L").crop((0, side, side, side + evaluate.CAPTION_HEIGHT)))
    assert caption.min() < 128  # the prompt is written beneath its picture


def _held_out_ce(config, workdir):
    """(tokens, mean cross-entropy) recomputed from the run's final model's full logits (not the
    fused loss) on the first two batches of the loop's held-out pipeline."""
    model = load(os.path.join(workdir, "final"))
    total, count = 0.0, 0
    for b in _held_out_batches(config, workdir, 2):
        logits, _ = model.forward(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"],
                                  is_continuous=b["is_continuous"], feature_index=b["feature_index"],
                                  pixels=b["pixels"])
        logits = np.asarray(logits, np.float64)[:, :-1]
        targets, segments = b["labels"][:, 1:], b["segment_ids"]
        valid = (targets >= 0) & (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
        top = logits.max(-1)
        lse = top + np.log(np.exp(logits - top[..., None]).sum(-1))
        picked = np.take_along_axis(logits, np.maximum(targets, 0)[..., None], -1)[..., 0]
        total += float(((lse - picked) * valid).sum())
        count += int(valid.sum())
    return count, total / count


def test_the_eval_loss_is_the_models_cross_entropy_on_the_held_out_batches(data, evaluated):
    """The step-4 evaluation measured exactly the first two held-out batches, on the final model."""
    workdir, _ = evaluated
    count, ce = _held_out_ce(_with_samples(data), workdir)
    assert _scalars(_events(workdir), "eval/tokens")[4] == count
    np.testing.assert_allclose(_scalars(_events(workdir), "eval/ce")[4], ce, rtol=1e-5)


def _repeats(config, workdir, n):
    """(slots, distinct samples) of the first `n` held-out batches, counted here."""
    ids = [i for b in _held_out_batches(config, workdir, n) for row in b["sample_ids"] for i in row]
    return len(ids), len(set(ids))


def _repeat_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "held-out batches hold" in r.getMessage()]


def test_a_run_with_unrolled_layers_trains_checkpoints_and_evaluates(data, tmp_path, caplog):
    """`model.scan_layers=False`: the train step and the evaluation unroll the layers inside; the
    checkpoint keeps the scanned layout, and the held-out loss is the final model's. Its 2 held-out
    batches are more than the 24 held-out samples fill: the held-out stream repeats, and some
    samples count twice in eval/loss, which was unsaid."""
    config = _config(data)
    config.model.scan_layers = False
    workdir = str(tmp_path / "unrolled")
    with caplog.at_level(logging.WARNING, logger="unitoken_jax"):
        train_and_evaluate(config, workdir)
    slots, distinct = _repeats(config, workdir, 2)
    assert distinct < slots
    assert _repeat_warnings(caplog) == [
        f"eval: the 2 held-out batches hold {slots} samples but only {distinct} distinct ones (each up to 2 times, "
        "weighted unevenly in eval/loss): lower eval.batches or hold more out (eval.holdout_fraction, eval.sources)"]
    state = ocp.PyTreeCheckpointer().metadata(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    decoder = state.item_metadata.tree["params"]["decoder"]
    assert "layers" in decoder and "layers_0" not in decoder
    count, ce = _held_out_ce(config, workdir)
    assert _scalars(_events(workdir), "eval/tokens")[4] == count
    np.testing.assert_allclose(_scalars(_events(workdir), "eval/ce")[4], ce, rtol=1e-5)


def test_a_run_trains_the_same_with_evaluation_as_without(data, evaluated, tmp_path):
    """Evaluation takes nothing from the train state or the training data, so the state after a run
    with it equals the state after one without (bit for bit), and so does every batch."""
    workdir, _ = evaluated
    plain = str(tmp_path / "plain")
    config = _config(data, every=0)
    train_and_evaluate(config, plain)
    assert not os.path.exists(os.path.join(plain, "samples"))
    assert not any(t.startswith("eval/") for t in _events(plain).Tags()["scalars"])

    def raw_state(w):
        path = os.path.join(w, "checkpoints", str(STEPS), "state")
        checkpointer = ocp.PyTreeCheckpointer()
        tree = checkpointer.metadata(path).item_metadata.tree
        return checkpointer.restore(path, restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))

    a, b = raw_state(workdir), raw_state(plain)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    read = lambda w: open(os.path.join(w, "samples.jsonl")).read()  # noqa: E731
    assert read(workdir) == read(plain)


def test_preemptions_around_evaluations_lose_none_of_them(data, tmp_path, monkeypatch, caplog):
    """A SIGTERM during an evaluation was saved one step late (the run trained a batch more); one
    at a step whose evaluation was due put it off for good (the resumed run starts after that step).
    Now the first saves the evaluated step, and the second's evaluation runs first on resume."""
    import signal

    workdir = str(tmp_path / "run")
    config = _config(data, batches=1)
    config.total_steps = 6
    real_run = evaluate.Evaluator.run

    def sigterm_in_the_evaluation(self, step, *args):
        out = real_run(self, step, *args)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="unitoken_jax"):
        m.setattr(evaluate.Evaluator, "run", sigterm_in_the_evaluation)
        train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    slots, distinct = _repeats(config, workdir, 1)
    assert slots == distinct and not _repeat_warnings(caplog)  # one batch: every held-out sample once

    def sigterm_before_step_4(step, batch):
        if step == 3:  # the batch of step 4, at which an evaluation is due
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    train_and_evaluate(config, workdir, batch_transform=sigterm_before_step_4)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert sorted(_scalars(_events(workdir), "eval/loss")) == [2]
    from unitoken_jax.train import metrics as metrics_lib

    # a SIGTERM during the evaluation the resumed run owes: step 4 is saved already, nothing is trained
    # (it trained and saved step 5)
    trained = []

    def sigterm_in_the_owed_evaluation(self, step, *args):
        out = real_run(self, step, *args)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    with monkeypatch.context() as m:
        m.setattr(evaluate.Evaluator, "run", sigterm_in_the_owed_evaluation)
        train_and_evaluate(config, workdir, batch_transform=lambda step, batch: trained.append(step) or batch)
    assert trained == [] and sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

    def sigterm_before_the_last_step(step, batch):
        if step == 5:  # the batch of step 6, the last, at which an evaluation is due
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    # preempted at the end: no final/ (it was exported, and a sweep called the run finished and never
    # resumed it, so the last evaluation never ran)
    train_and_evaluate(config, workdir, batch_transform=sigterm_before_the_last_step)
    assert sorted(_scalars(_events(workdir), "eval/loss")) == [2, 4] and not os.path.exists(
        os.path.join(workdir, "final"))
    excluded = []  # evaluations' time, left out of tokens/s and MFU: the one put off too
    real_exclude = metrics_lib.Window.exclude
    monkeypatch.setattr(metrics_lib.Window, "exclude", lambda self, s: excluded.append(s) or real_exclude(self, s))
    train_and_evaluate(config, workdir)
    assert sorted(_scalars(_events(workdir), "eval/loss")) == [2, 4, 6] and len(excluded) == 1
    assert os.path.isdir(os.path.join(workdir, "final"))


def test_the_prompts_are_drawn_with_the_configs_template(data, tmp_path, monkeypatch):
    """`eval.template` is the prompts' drawing template (a model trained with another than the
    reference's); "" leaves the pipeline's."""
    from unitoken_jax.train import evaluate as evaluate_module

    made = []

    class Stop(Exception):
        pass

    def recording(*args, **kwargs):
        made.append(kwargs.get("generate_template"))
        raise Stop

    monkeypatch.setattr(evaluate_module, "UniTokenPipeline", recording)
    for template in ("Draw {w}x{h}: {prompt}", ""):
        config = _with_samples(data)
        config.eval.template = template
        with pytest.raises(Stop):
            train_and_evaluate(config, str(tmp_path / f"run{len(made)}"))
    assert made == ["Draw {w}x{h}: {prompt}", None]


# --- the config ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (dict(every=-1), "eval.every must be 0"),
    (dict(holdout_fraction=-0.1), "eval.holdout_fraction must be 0"),
    (dict(holdout_fraction=1.0), "eval.holdout_fraction=1.0 would leave nothing to train on"),
    (dict(holdout_fraction=0.0), "eval.every=2 needs held-out data"),
    (dict(sources=("/data/held_out",)), "eval.sources and eval.holdout_fraction are both set"),
    (dict(batches=0), "eval.batches must be at least 1"),
    (dict(prompts=("a red circle",)), "eval.prompts needs eval.tokenizer and eval.vqgan"),
    (dict(template="Draw a nice picture"), "eval.template: a drawing template needs {prompt}"),
    (dict(template="{prompt} at {size}"), "eval.template: a drawing template may name only {prompt}, {w} and {h}"),
    (dict(questions=(("", "What is it?"),), tokenizer="tokenizer.json"), "eval.questions needs eval.tokenizer"),
    (dict(tokenizer="demo", vqgan="/models/vqgan"), "eval.tokenizer='demo' and eval.vqgan='demo' go together"),
    (dict(size=100), "eval.size=100 must be a multiple of 32"),
    (dict(cfg=0.0), "eval.cfg=0.0 must be positive"),
    (dict(questions=(("What is it?",),), tokenizer="demo", vqgan="demo"), r"config.eval.questions\[0\] must have 2"),
    (dict(evry=5), r"unknown key\(s\) config.eval.evry"),
    (dict(every="5"), "config.eval.every must be int"),
])
def test_bad_eval_settings_are_errors_naming_the_key(data, overrides, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_config_dict(_config(data, **overrides))


def test_a_config_without_eval_evaluates_nothing(data):
    c = _config(data)
    del c["eval"]
    config = TrainConfig.from_config_dict(c)
    assert config.eval == EvalConfig() and config.eval.every == 0 and config.eval.holdout_fraction == 0
    assert TrainConfig.from_config_dict(_with_samples(data)).eval.questions[1] == ("", "Say something.")


# --- the sweep summary -----------------------------------------------------------------------
def test_the_sweep_summary_shows_the_last_eval_losses(evaluated, tmp_path):
    workdir, _ = evaluated
    metrics = sweep_lib.final_metrics(workdir)
    ea = _events(workdir)
    for tag in sweep_lib.EVAL_METRICS:
        assert metrics[tag] == pytest.approx(_scalars(ea, tag)[4])
    row = {"index": 0, "overrides": {"data.seed": 0}, "status": "finished", "step": metrics.pop("step"),
           "total_steps": STEPS, "metrics": metrics, "workdir": workdir}
    table = sweep_lib.format_table([row]).splitlines()
    assert table[0].split()[-3:] == list(sweep_lib.EVAL_METRICS)
    assert table[2].split()[-1] == f"{metrics['eval/ce_generation']:.4f}"
    without = dict(row, metrics={k: v for k, v in metrics.items() if not k.startswith("eval/")})
    assert "eval/loss" not in sweep_lib.format_table([without])
