"""The bundled default model: a small UniToken trained on the shapes world
(`python -m unitoken_jax.world.build`), shipped inside the package so that `unitoken generate`
and `unitoken understand` work right after install, with nothing to download.

    DEFAULT_DIR/model/      the model in the HF layout (safetensors, bfloat16) + config.json, and
                            trained_pictures.json: how it draws (so a copy named as --model draws so)
    DEFAULT_DIR/vqgan/      its VQ-GAN (vqgan.safetensors + vqgan_config.json)
    DEFAULT_DIR/tokenizer.json
    DEFAULT_DIR/world.json  how it was trained: VQ crop size, picture size, no image prefix, results
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile

import unitoken_jax
from unitoken_jax.inference.pipeline import TRAINED_PICTURES, UniTokenPipeline, trained_record
from unitoken_jax.tokenizer.text import TextTokenizer
from unitoken_jax.vq_tokenizer import VQTokenizer
from unitoken_jax.world.shapes import GEN_SIZE, GENERATE_TEMPLATE, VQ_SIZE, tokenizer_json

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shapes")


def available(path: str = DEFAULT_DIR) -> bool:
    """Whether `path` holds a bundled model (the package's own, unless the install left it out)."""
    return os.path.exists(os.path.join(path, "world.json"))


def settings(path: str = DEFAULT_DIR) -> dict:
    """The bundled model's `world.json`: its picture size, vq_size, image prefix and what it was built with."""
    if not available(path):
        raise FileNotFoundError(f"no bundled model in {path} (build one: python -m unitoken_jax.world.build, then "
                                "python -m unitoken_jax.world.default --model ... --vqgan ...)")
    with open(os.path.join(path, "world.json")) as f:
        return json.load(f)


EXPORTED = ("model", "vqgan", "tokenizer.json", "world.json")  # what an export writes, and all it replaces


def export(model_dir: str, vq_dir: str, dest: str = DEFAULT_DIR, results: dict | None = None) -> None:
    """Writes the model (bfloat16, HF layout), its VQ-GAN, the tokenizer and world.json to `dest`:
    a new or empty folder, or an earlier export, which is replaced only once the new one is
    written whole (so `dest` may hold the sources). A folder holding anything else is refused
    (it had been deleted whole, a build's workdir with it)."""
    if os.path.exists(dest):
        if not os.path.isdir(dest):
            raise ValueError(f"--to {dest} is a file; give a folder")
        foreign = sorted(set(os.listdir(dest)) - set(EXPORTED))
        if foreign:
            raise ValueError(f"--to {dest} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which "
                             "an export does not write: give a new or empty folder, or an earlier export's")
    model = unitoken_jax.load(model_dir, progress=False)
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        model.save_hf(os.path.join(staging, "model"), dtype="bfloat16")
        shutil.copytree(vq_dir, os.path.join(staging, "vqgan"),
                        ignore=shutil.ignore_patterns("history.json", "build_settings.json"))
        with open(os.path.join(staging, "tokenizer.json"), "w") as f:
            f.write(tokenizer_json())
        with open(os.path.join(staging, "model", TRAINED_PICTURES), "w") as f:
            json.dump(record(TextTokenizer(tokenizer_json()), VQTokenizer.from_dir(os.path.join(staging, "vqgan")),
                             trained_record(model_dir)), f, indent=1)
        with open(os.path.join(staging, "world.json"), "w") as f:
            json.dump({"vq_size": VQ_SIZE, "size": list(GEN_SIZE), "image_prefix": [], "results": results or {}},
                      f, indent=1)
        if os.path.exists(dest):
            old = staging + ".old"
            os.replace(dest, old)
            os.replace(staging, dest)
            shutil.rmtree(old)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def record(tokenizer, vq, trained: dict | None = None) -> dict:
    """The bundled model's `TRAINED_PICTURES` (kept beside its weights, and by every copy the package
    makes of them): its training's record (`trained`, where the build wrote one) with how the world
    asks for and draws pictures, the pipeline's defaults for a model that records them."""
    made_with = {"tokenizer_sha256": tokenizer.fingerprint(), "vqgan_sha256": vq.fingerprint()}
    return {"continuous": True, "anyres": False, **(trained or {}), "vq_size": VQ_SIZE, "sizes": [list(GEN_SIZE)],
            "image_prefix": [], "generate_template": GENERATE_TEMPLATE, **made_with}


def describe() -> str:
    """What the bundled model knows, in one paragraph (logged when it loads)."""
    from unitoken_jax.data.drawing import COLOURS, PLACES, SHAPES
    from unitoken_jax.world.shapes import PLACE_QUESTIONS, QUESTIONS, SIZE

    questions = list(QUESTIONS.values()) + [q.format(place="top left") for q in PLACE_QUESTIONS.values()]
    return (f"the bundled model knows only the shapes world: {SIZE} x {SIZE} px pictures of one to three "
            f"{', '.join(COLOURS)} {', '.join(s + 's' for s in SHAPES)} at the {', '.join(PLACES)}. It draws captions "
            f"such as 'a red circle at the top left and a blue square at the bottom right', and answers "
            f"{' / '.join(repr(q) for q in questions)}. Anything else (other objects, photos, editing, chat) gets an "
            "answer from that world, not a refusal; give --model for a real checkpoint")


def pipeline(path: str = DEFAULT_DIR, dtype: str = "float32", mesh=None, quantize: str | None = None,
             adapters: str | None = None, cache_growth: int | None = None, param_dtype: str = "float32",
             layers: str = "auto"):
    """The bundled model as a `UniTokenPipeline` (computing in `dtype`, its parameters held in
    `param_dtype` and sharded over `mesh` if given;
    `quantize="int8"` for int8 weights; `adapters`: LoRA adapters for it in PEFT's format, e.g. the
    French ones of `world.finetune_demo`; `cache_growth`, `layers`: see `DecodeLoop`). `path`: a
    folder laid out as the bundled one (`python -m unitoken_jax.world.default` writes one)."""
    s = settings(path)
    logging.getLogger(__name__).info(describe())
    model = unitoken_jax.load(os.path.join(path, "model"), progress=False, dtype=dtype, param_dtype=param_dtype,
                              mesh=mesh, quantize=quantize, adapters=adapters)
    return UniTokenPipeline(model, TextTokenizer.from_file(os.path.join(path, "tokenizer.json")),
                            VQTokenizer.from_dir(os.path.join(path, "vqgan")), vq_size=s["vq_size"],
                            image_prefix=s["image_prefix"], cache_growth=cache_growth,
                            default_size=tuple(s["size"]), trained_sizes=[tuple(s["size"])], layers=layers,
                            generate_template=GENERATE_TEMPLATE)  # (what it was trained to draw from)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m unitoken_jax.world.default", allow_abbrev=False,
                                     description="export a trained shapes-world model as the bundled default")
    parser.add_argument("--workdir", default=None, help="a world.build workdir (its stage2/final, vqgan, results.json)")
    parser.add_argument("--model", default=None, help="the model directory (default: WORKDIR/stage2/final)")
    parser.add_argument("--vqgan", default=None, help="its VQ-GAN directory (default: WORKDIR/vqgan)")
    parser.add_argument("--results", default=None, help="the evaluation's results JSON, kept in world.json")
    parser.add_argument("--to", default=DEFAULT_DIR, help="where to write it (default: this install's own bundled "
                                                          f"model, which it replaces: {DEFAULT_DIR})")
    a = parser.parse_args()
    if a.workdir:
        a.model = a.model or os.path.join(a.workdir, "stage2", "final")
        a.vqgan = a.vqgan or os.path.join(a.workdir, "vqgan")
        found = os.path.join(a.workdir, "results.json")
        a.results = a.results or (found if os.path.exists(found) else None)
    if not (a.model and a.vqgan):
        parser.error("give --workdir, or --model and --vqgan")
    try:
        export(a.model, a.vqgan, a.to, json.load(open(a.results)) if a.results else None)
    except (ValueError, OSError) as e:  # (a missing --workdir's model was a FileNotFoundError traceback)
        parser.error(str(e))
    print(f"wrote {a.to}")
