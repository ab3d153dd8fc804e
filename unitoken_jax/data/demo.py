"""A small picture world for demos and tests: one coloured shape on a plain background (the
shapes world's table, `data.drawing`), with a caption, a question and answer, and a
text-to-image prompt for each picture.

`write_demo_items(directory, n)` draws the pictures (PNG) and writes `items.json` in the
reference's conversation format: understanding items (picture in the human turn) and generation
items (picture in the assistant turn), alternating.
"""

from __future__ import annotations

import json
import os

import numpy as np

from unitoken_jax.data import pretokenize as pt
from unitoken_jax.data.drawing import COLOURS, PLACES, SHAPES, Thing, draw
from unitoken_jax.models.vqgan import VQGANConfig
from unitoken_jax.tokenizer import small
from unitoken_jax.tokenizer.text import TextTokenizer
from unitoken_jax.vq_tokenizer import VQTokenizer


def write_demo_items(directory: str, n: int = 64, seed: int = 0) -> str:
    """Draws `n` pictures of one shape each (`data.drawing`'s table) into `directory` and writes
    `items.json` there; returns its path."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    items = []
    for i in range(n):
        thing = Thing(list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))],
                      list(PLACES)[rng.integers(len(PLACES))])
        name = f"{i:05d}.png"
        draw([thing]).save(os.path.join(directory, name))
        if i % 2 == 0:
            conv = [{"from": "human", "value": "<|image|>What is in the picture?"},
                    {"from": "gpt", "value": thing.text}]
        else:
            conv = [{"from": "human", "value": f"Generate an image of {thing.text}."},
                    {"from": "gpt", "value": "<|image|>"}]
        items.append({"id": f"demo-{i}", "conversations": conv, "image": [name]})
    path = os.path.join(directory, "items.json")
    with open(path, "w") as f:
        json.dump(items, f, indent=0)
    return path


DEMO_VQGAN = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, embed_dim=8)


def demo_tokenizers(seed: int = 0):
    """(text tokenizer, VQ tokenizer) for the demo: the small byte-level tokenizer and a small VQ-GAN
    with random weights (a fixed, deterministic image -> codes map; nothing is downloaded)."""
    return TextTokenizer(small.build(seed)), VQTokenizer.random(VQGANConfig(**DEMO_VQGAN), seed=seed)


def build_demo_dataset(directory: str, n: int = 256, *, siglip_size: int = 56, vq_size: int = 32, patch: int = 14,
                       seed: int = 0, progress: bool = False) -> str:
    """Draws the demo pictures and pre-tokenizes them into `directory/dataset` (once; a finished
    dataset is reused). Returns the dataset path."""
    out = os.path.join(directory, "dataset")
    if os.path.exists(os.path.join(out, pt.SETTINGS_FILE)):
        return out
    items = write_demo_items(os.path.join(directory, "pictures"), n, seed)
    text, vq = demo_tokenizers(seed)
    settings = pt.PretokenizeSettings(name="demo", vq_size=vq_size, siglip_size=siglip_size, patch=patch,
                                      max_length=None, chunk_size=128, vq_batch=64)
    pt.pretokenize(items, out, text, vq, settings, progress=progress)
    return out
