"""A small picture world for demos and tests: one coloured shape on a plain background, with a
caption, a question and answer, and a text-to-image prompt for each picture.

`write_demo_items(directory, n)` draws the pictures (PNG) and writes `items.json` in the
reference's conversation format: understanding items (picture in the human turn) and generation
items (picture in the assistant turn), alternating.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7),
          "centre": (0.5, 0.5)}


def draw(colour: str, shape: str, place: str, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(image)
    cx, cy = (v * size for v in PLACES[place])
    r = size * 0.18
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def write_demo_items(directory: str, n: int = 64, seed: int = 0, size: int = 64) -> str:
    """Draws `n` pictures into `directory` and writes `items.json` there; returns its path."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    items = []
    for i in range(n):
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        place = list(PLACES)[rng.integers(len(PLACES))]
        name = f"{i:05d}.png"
        draw(colour, shape, place, size).save(os.path.join(directory, name))
        text = f"a {colour} {shape} at the {place}"
        if i % 2 == 0:
            conv = [{"from": "human", "value": "<|image|>What is in the picture?"}, {"from": "gpt", "value": text}]
        else:
            conv = [{"from": "human", "value": f"Generate an image of {text}."}, {"from": "gpt", "value": "<|image|>"}]
        items.append({"id": f"demo-{i}", "conversations": conv, "image": [name]})
    path = os.path.join(directory, "items.json")
    with open(path, "w") as f:
        json.dump(items, f, indent=0)
    return path


DEMO_VQGAN = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, embed_dim=8)


def demo_tokenizers(seed: int = 0):
    """(text tokenizer, VQ tokenizer) for the demo: the small byte-level tokenizer and a small VQ-GAN
    with random weights (a fixed, deterministic image -> codes map; nothing is downloaded)."""
    from unitoken_jax.models.vqgan import VQGANConfig
    from unitoken_jax.tokenizer import small
    from unitoken_jax.tokenizer.text import TextTokenizer
    from unitoken_jax.tokenizer.vq import VQTokenizer

    return TextTokenizer(small.build(seed)), VQTokenizer.random(VQGANConfig(**DEMO_VQGAN), seed=seed)


def build_demo_dataset(directory: str, n: int = 256, *, siglip_size: int = 56, vq_size: int = 32,
                       seed: int = 0, progress: bool = False) -> str:
    """Draws the demo pictures and pre-tokenizes them into `directory/dataset` (once; a finished
    dataset is reused). Returns the dataset path."""
    from unitoken_jax.data import pretokenize as pt

    out = os.path.join(directory, "dataset")
    if os.path.exists(os.path.join(out, pt.SETTINGS_FILE)):
        return out
    items = write_demo_items(os.path.join(directory, "pictures"), n, seed)
    text, vq = demo_tokenizers(seed)
    settings = pt.PretokenizeSettings(name="demo", vq_size=vq_size, siglip_size=siglip_size, max_length=None,
                                      chunk_size=128, vq_batch=64)
    pt.pretokenize(items, out, text, vq, settings, progress=progress)
    return out
