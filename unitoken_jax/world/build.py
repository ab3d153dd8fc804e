"""Train UniToken on the shapes world end to end, on a CPU, with the real pipeline:

    VQ-GAN (trained here) -> items -> `pretokenize` -> Grain 1:1 mix -> stage I -> stage II -> evaluation

    python -m unitoken_jax.world.build --workdir /tmp/world            # everything (cached per step)
    python -m unitoken_jax.world.build --workdir /tmp/world --discrete-only   # the ablation's model

Each step's output is kept under WORKDIR with the settings it was made with, and reused by a later
run with the same settings (one with other flags is refused, naming them: delete the step's folder
to make it again).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time

import ml_collections
import numpy as np

from unitoken_jax import argtypes
from unitoken_jax.configs import stages
from unitoken_jax.convert.vqgan import save_vqgan
from unitoken_jax.data import pretokenize as pt
from unitoken_jax.tokenizer import images as image_io
from unitoken_jax.tokenizer.text import TextTokenizer
from unitoken_jax.shutdown import Terminated, exit_now, stop_on_signals
from unitoken_jax.train.loop import train_and_evaluate
from unitoken_jax.train.vqgan import VQTrainConfig, train_vqgan
from unitoken_jax.vq_tokenizer import VQTokenizer
from unitoken_jax.world import shapes
from unitoken_jax.world.shapes import (
    PATCH,
    SIGLIP_SIZE,
    VQ_CONFIG,
    VQ_SIZE,
    tokenizer_json,
    vocab_size,
)

log = logging.getLogger(__name__)

def model_config() -> dict:
    return dict(
        decoder=dict(vocab_size=vocab_size(), hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4,
                     num_kv_heads=4, rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-5,
                     qk_norm_eps=1e-5, qk_norm_groups=None, swin_norm=False, dropout=0.05),
        vision=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, patch_size=PATCH,
                    image_size=SIGLIP_SIZE, num_channels=3, layer_norm_eps=1e-6),
        z_loss_weight=1e-5, dtype="float32", param_dtype="float32", scan_layers=True, remat_policy="none")


def stage_config(stage: int, data: str, steps: int, init_from: str | None = None) -> ml_collections.ConfigDict:
    """The packaged tiny stage config (configs/stages.py) with the world's model, data and schedule."""
    c = stages.stage_config(stage, "tiny")
    c.model_name = "shapes_world"
    c.model = ml_collections.ConfigDict(model_config())
    c.init_from.update(kind="stage" if init_from else "random", paths=(init_from,) if init_from else ())
    c.optimizer.update(learning_rate=3e-3 if stage == 1 else 2e-3, vit_lr_scale=1.0, warmup_fraction=0.05)
    # rows of 256 (the tiny configs' length until 2026-12-05): the world's samples are short, many a row
    c.data.update(sources=(data,), demo=False, length=256, max_images=32, seed=stage)
    c.mesh.num_devices = 1
    # (saved every CHECKPOINT_EVERY steps: a stop goes on from there when the build runs again)
    c.update(total_steps=steps, log_every=50, checkpoint_every=min(max(steps, 1), CHECKPOINT_EVERY),
             keep_checkpoints=1, log_sample_ids=False)
    return c


CHECKPOINT_EVERY = 100  # the world's training runs save this often (they had saved only at their end)


SETTINGS = "build_settings.json"  # beside each step's output: what it was made with


class SettingsError(ValueError):
    """A build's flags that cannot be used, or that differ from those a step it would reuse was made with."""


class Stopped(Exception):
    """A training run of a world script that ended before its last step (a SIGTERM: its step saved)."""


def train(config: ml_collections.ConfigDict, run_dir: str) -> None:
    """`train_and_evaluate`, and a `Stopped` if it ended early: a preempted run returns as a finished
    one does, and the script went on to what the run had not made (recording its settings, then a
    FileNotFoundError for the adapters or model it had not written)."""
    train_and_evaluate(config, run_dir)
    if not os.path.isdir(os.path.join(run_dir, "final")):
        checkpoints = os.path.join(run_dir, "checkpoints")
        saved = os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))
        # (a SIGTERM while the run was built saves nothing: it said "its last step is saved" even so)
        raise Stopped(f"the training in {run_dir} stopped before its end (SIGTERM; "
                      + ("its last step is saved): run the same command again to go on from it" if saved else
                         "before its first step, nothing to save): run the same command again to start it"))


def script(parser: argparse.ArgumentParser, as_program: bool, work):
    """`work()`'s value; a settings error as argparse's, and a stop (SIGTERM, Ctrl-C) as one line
    and exit status 143 / 130, not a traceback. Each finished step and the training's checkpoints
    stay, and the same command goes on from them."""
    if as_program:  # (a SIGTERM outside the trainings, whose own handler saves a step, killed it unsaid)
        stop_on_signals(sigterm=True)
    try:
        return work()
    except SettingsError as e:
        parser.error(str(e))
    except (Stopped, KeyboardInterrupt) as e:
        again = "run the same command again to go on from its finished steps and its last checkpoint"
        said, code = ((str(e), 143) if isinstance(e, Stopped) else (f"stopped (SIGTERM): {again}", 143)
                      if isinstance(e, Terminated) else (f"stopped (Ctrl-C): {again}", 130))
        print(f"\n{parser.prog}: {said}", file=sys.stderr)
        if as_program:
            exit_now(code)  # (the interpreter's teardown after a Ctrl-C in XLA could crash)
        raise SystemExit(code) from None


def reuse(out: str, done: bool, settings: dict) -> bool:
    """Whether the step whose output is `out` is done (`done`) with these `settings`: a step done
    with other settings is an error naming them (a rerun with new flags reused it silently, even
    an untrained VQ-GAN); one done before its settings were recorded is reused, and the log says so."""
    if not done:
        return False
    path = os.path.join(out, SETTINGS)
    if not os.path.exists(path):
        log.warning("reusing %s, made before its settings were recorded (delete it to make it again)", out)
        return True
    with open(path) as f:
        before = json.load(f)
    unrecorded = [k for k in settings if k not in before]
    if unrecorded:  # (recorded by a later version: what the step was made from, besides its own flags)
        log.warning("%s was made before %s were recorded: reused as it is (delete it to make it again)", out,
                    ", ".join(unrecorded))
    changed = {k: (before[k], v) for k, v in settings.items() if k in before and before[k] != v}
    if changed:
        said = ", ".join(f"{k} {was} (now {now})" for k, (was, now) in changed.items())
        raise SettingsError(f"{out} was made with {said}; delete it to make it again, or use another --workdir")
    log.info("reusing %s (%s)", out, ", ".join(f"{k} {v}" for k, v in settings.items()))
    return True


def record(out: str, settings: dict) -> None:
    with open(os.path.join(out, SETTINGS), "w") as f:
        json.dump(settings, f)


def train_vq(workdir: str, steps: int, pictures: int = 3000, ran: dict | None = None) -> str:
    """Trains the world's VQ-GAN (unless done); `ran` gets the seconds it took."""
    out = os.path.join(workdir, "vqgan")
    settings = {"steps": steps, "pictures": pictures}
    if reuse(out, os.path.exists(os.path.join(out, "vqgan.safetensors")), settings):
        return out
    start = time.time()
    rng = np.random.default_rng(0)
    pool = shapes.train_things()
    pixels = np.stack([image_io.vq_pixels(image_io.vq_crop(shapes.draw(shapes.scene(rng, pool), rng), VQ_SIZE))
                       for _ in range(pictures)])
    params, history = train_vqgan(VQ_CONFIG, pixels, VQTrainConfig(steps=steps, batch=32, learning_rate=2e-3))
    # written beside, then moved into place whole: a folder with its weights but not its config (a
    # stop while it was saved) was reused as a VQ-GAN made before settings were recorded, then failed
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_vqgan(partial, VQ_CONFIG, params)
    with open(os.path.join(partial, "history.json"), "w") as f:
        json.dump(history, f)
    record(partial, settings)
    shutil.rmtree(out, ignore_errors=True)  # (what a step not done left: nothing of it is reused)
    os.replace(partial, out)
    if ran is not None:
        ran["vqgan"] = time.time() - start
    return out


def make_data(workdir: str, vq_dir: str, pictures: int, continuous: bool, ran: dict | None = None,
              made_from: dict | None = None) -> str:
    """Writes and pre-tokenizes the training items (unless done); `ran` gets the seconds it took.
    `made_from`: the settings of the steps before (the VQ-GAN's), recorded with it and compared."""
    out = os.path.join(workdir, "data" if continuous else "data_discrete")
    settings_made = {"pictures": pictures, **(made_from or {})}
    if reuse(out, os.path.exists(os.path.join(out, pt.SETTINGS_FILE)), settings_made):
        return out
    start = time.time()
    items = shapes.write_items(os.path.join(workdir, "items"), pictures, seed=0)
    settings = pt.PretokenizeSettings(name="shapes", vq_size=VQ_SIZE, siglip_size=SIGLIP_SIZE, patch=PATCH,
                                      max_length=None, chunk_size=1024, vq_batch=256, continuous=continuous)
    pt.pretokenize(items, out, TextTokenizer(tokenizer_json()), VQTokenizer.from_dir(vq_dir), settings)
    record(out, settings_made)
    if ran is not None:
        ran["pretokenize"] = time.time() - start
    return out


def build(workdir: str, *, vq_steps: int, pictures: int, stage1_steps: int, stage2_steps: int,
          continuous: bool = True) -> str:
    """Runs every step not done yet; returns the stage-II model directory."""

    for name, value in (("vq_steps", vq_steps), ("pictures", pictures), ("stage1_steps", stage1_steps),
                        ("stage2_steps", stage2_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingsError(f"{name}={value!r}: a whole number, at least 1")
    if os.path.exists(workdir) and not os.path.isdir(workdir):  # (makedirs' FileExistsError traceback)
        raise SettingsError(f"--workdir {workdir} is a file; give a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:  # (under a file, a read-only or missing place: makedirs' traceback)
        raise SettingsError(f"--workdir {workdir} cannot be made: {e.strerror or e}") from None
    suffix = "" if continuous else "_discrete"
    timings_path = os.path.join(workdir, f"timings{suffix}.json")
    timings = {}
    if os.path.exists(timings_path):  # a step reused keeps the time it took when it ran
        with open(timings_path) as f:
            timings = json.load(f)
    ran = {}  # the seconds of each step that ran (not reused)

    def keep():  # after every step: a build stopped later keeps the times of the steps it finished
        timings.update(ran)
        with open(timings_path, "w") as f:
            json.dump(timings, f, indent=1)

    # each step records the settings of the steps it was made from too: a step made again (its
    # folder deleted, as a refusal says) is not followed by the old steps made from its predecessor
    vq_dir = train_vq(workdir, vq_steps, ran=ran)
    keep()
    data = make_data(workdir, vq_dir, pictures, continuous, ran=ran, made_from={"vq_steps": vq_steps})
    keep()
    stage1, stage2 = os.path.join(workdir, "stage1" + suffix), os.path.join(workdir, "stage2" + suffix)
    made_from = {"vq_steps": vq_steps, "pictures": pictures}
    t = time.time()
    stage1_settings = {"steps": stage1_steps, **made_from}
    if continuous and not reuse(stage1, os.path.isdir(os.path.join(stage1, "final")), stage1_settings):
        _train_stage("stage I", "--stage1-steps", stage_config(1, data, stage1_steps), stage1)
        record(stage1, stage1_settings)
        ran["stage1"] = time.time() - t
        keep()
    t = time.time()
    stage2_settings = {"steps": stage2_steps, **made_from, **({"stage1_steps": stage1_steps} if continuous else {})}
    if not reuse(stage2, os.path.isdir(os.path.join(stage2, "final")), stage2_settings):
        _train_stage("stage II", "--stage2-steps", stage_config(2, data, stage2_steps, stage1 if continuous else None),
                     stage2)
        record(stage2, stage2_settings)
        ran["stage2"] = time.time() - t
    keep()
    log.info("timings (s): %s", timings)
    return os.path.join(stage2, "final")


def _train_stage(name: str, flag: str, config: ml_collections.ConfigDict, run_dir: str) -> None:
    """`train`, with the run's refusal of these settings said in one line (a stopped stage resumed
    with fewer steps than it had reached was a traceback naming `total_steps`, not the flag)."""
    try:
        train(config, run_dir)
    except ValueError as e:
        if "past total_steps" in str(e):
            raise SettingsError(f"{name} in {run_dir} has trained past {flag} {config.total_steps}: give a larger "
                                f"{flag}, or delete {run_dir} to train it again") from None
        raise


count = argtypes.whole  # an argparse type: a whole number of at least its argument (1 by default)


def positive(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m unitoken_jax.world.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--vq-steps", type=count(), default=1500, help="VQ-GAN training steps (default: 1500)")
    parser.add_argument("--pictures", type=count(), default=4000, help="training scenes (default: 4000)")
    parser.add_argument("--stage1-steps", type=count(), default=100, help="stage I steps (default: 100)")
    parser.add_argument("--stage2-steps", type=count(), default=1500, help="stage II steps (default: 1500)")
    parser.add_argument("--discrete-only", action="store_true", help="images without SigLIP features (the ablation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)  # absl may have configured the root logger already
    logging.getLogger("absl").setLevel(logging.WARNING)  # (Orbax's checkpoint chatter: 200 of 245 lines)
    model = script(parser, argv is None, lambda: build(
        args.workdir, vq_steps=args.vq_steps, pictures=args.pictures, stage1_steps=args.stage1_steps,
        stage2_steps=args.stage2_steps, continuous=not args.discrete_only))
    print(f"model: {model}")


if __name__ == "__main__":
    main()
