"""Train UniToken on the shapes world end to end, on a CPU, with the real pipeline:

    VQ-GAN (trained here) -> items -> `pretokenize` -> Grain 1:1 mix -> stage I -> stage II -> evaluation

    python -m unitoken_jax.world.build --workdir /tmp/world            # everything (cached per step)
    python -m unitoken_jax.world.build --workdir /tmp/world --discrete-only   # the ablation's model

Each step's output is kept under WORKDIR and reused by a later run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import ml_collections
import numpy as np

from unitoken_jax.configs import stages
from unitoken_jax.convert.vqgan import save_vqgan
from unitoken_jax.data import pretokenize as pt
from unitoken_jax.tokenizer import images as image_io
from unitoken_jax.tokenizer.text import TextTokenizer
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
    c.update(total_steps=steps, log_every=50, checkpoint_every=max(steps, 1), keep_checkpoints=1,
             log_sample_ids=False)
    return c


def train_vq(workdir: str, steps: int, pictures: int = 3000) -> str:
    out = os.path.join(workdir, "vqgan")
    if os.path.exists(os.path.join(out, "vqgan.safetensors")):
        return out
    rng = np.random.default_rng(0)
    pool = shapes.train_things()
    pixels = np.stack([image_io.vq_pixels(image_io.vq_crop(shapes.draw(shapes.scene(rng, pool), rng), VQ_SIZE))
                       for _ in range(pictures)])
    params, history = train_vqgan(VQ_CONFIG, pixels, VQTrainConfig(steps=steps, batch=32, learning_rate=2e-3))
    save_vqgan(out, VQ_CONFIG, params)
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(history, f)
    return out


def make_data(workdir: str, vq_dir: str, pictures: int, continuous: bool) -> str:

    out = os.path.join(workdir, "data" if continuous else "data_discrete")
    if os.path.exists(os.path.join(out, pt.SETTINGS_FILE)):
        return out
    items = shapes.write_items(os.path.join(workdir, "items"), pictures, seed=0)
    settings = pt.PretokenizeSettings(name="shapes", vq_size=VQ_SIZE, siglip_size=SIGLIP_SIZE, patch=PATCH,
                                      max_length=None, chunk_size=1024, vq_batch=256, continuous=continuous)
    pt.pretokenize(items, out, TextTokenizer(tokenizer_json()), VQTokenizer.from_dir(vq_dir), settings)
    return out


def build(workdir: str, *, vq_steps: int, pictures: int, stage1_steps: int, stage2_steps: int,
          continuous: bool = True) -> str:
    """Runs every step not done yet; returns the stage-II model directory."""

    os.makedirs(workdir, exist_ok=True)
    timings = {}
    t = time.time()
    vq_dir = train_vq(workdir, vq_steps)
    timings["vqgan"] = time.time() - t
    t = time.time()
    data = make_data(workdir, vq_dir, pictures, continuous)
    timings["pretokenize"] = time.time() - t
    suffix = "" if continuous else "_discrete"
    stage1, stage2 = os.path.join(workdir, "stage1" + suffix), os.path.join(workdir, "stage2" + suffix)
    t = time.time()
    if continuous and not os.path.isdir(os.path.join(stage1, "final")):
        train_and_evaluate(stage_config(1, data, stage1_steps), stage1)
    timings["stage1"] = time.time() - t
    t = time.time()
    if not os.path.isdir(os.path.join(stage2, "final")):
        train_and_evaluate(stage_config(2, data, stage2_steps, stage1 if continuous else None), stage2)
    timings["stage2"] = time.time() - t
    with open(os.path.join(workdir, f"timings{suffix}.json"), "w") as f:
        json.dump(timings, f, indent=1)
    log.info("timings (s): %s", timings)
    return os.path.join(stage2, "final")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--vq-steps", type=int, default=1500)
    parser.add_argument("--pictures", type=int, default=4000)
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--stage2-steps", type=int, default=1500)
    parser.add_argument("--discrete-only", action="store_true", help="images without SigLIP features (the ablation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)  # absl may have configured the root logger already
    model = build(args.workdir, vq_steps=args.vq_steps, pictures=args.pictures, stage1_steps=args.stage1_steps,
                  stage2_steps=args.stage2_steps, continuous=not args.discrete_only)
    print(f"model: {model}")


if __name__ == "__main__":
    main()
