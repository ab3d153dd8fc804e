"""Evaluation on the shapes world's held-out combinations.

Understanding: exact-match answers (greedy) to the five questions about pictures of held-out
combinations (and the count question about two-shape pictures). Generation: pictures drawn for
held-out prompts, judged by the model-free pixel checker (`shapes.check_picture`): right only if
colour, shape and place are all right; with and without classifier-free guidance.

    python -m unitoken_jax.world.evaluate --workdir /tmp/world    # its model and, if built, the ablation's
    python -m unitoken_jax.world.evaluate --model DIR --vqgan DIR [--discrete-only]

The paper's ablation: the same budget with discrete codes only (`world.build --discrete-only`
trains it in the same workdir) against discrete + continuous, in one table.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw

import unitoken_jax
from unitoken_jax.inference.pipeline import UniTokenPipeline
from unitoken_jax.tokenizer import images as image_io
from unitoken_jax.tokenizer.text import TextTokenizer
from unitoken_jax.vq_tokenizer import VQTokenizer
from unitoken_jax.world import shapes
from unitoken_jax.world.shapes import GEN_SIZE, VQ_SIZE, tokenizer_json

# a uniform guess among the world's answers to each question (the count's: one, two or three; it
# said 1/2). Not the majority baseline: two thirds of the count cases show one shape
CHANCE = {"colour": 1 / len(shapes.COLOURS), "shape": 1 / len(shapes.SHAPES), "place": 1 / len(shapes.PLACES),
          "count": 1 / len(shapes.COUNTS), "caption": 1 / (len(shapes.COLOURS) * len(shapes.SHAPES) * len(shapes.PLACES))}


def world_pipeline(model_dir: str, vq_dir: str, continuous: bool = True):
    model = unitoken_jax.load(model_dir, progress=False)
    return UniTokenPipeline(model, TextTokenizer(tokenizer_json()), VQTokenizer.from_dir(vq_dir), vq_size=VQ_SIZE,
                            image_prefix=(), continuous=continuous, generate_template=shapes.GENERATE_TEMPLATE)


def understanding(pipe, per_thing: int = 4, seed: int = 1, batch: int = 64,
                  language: shapes.Language = shapes.ENGLISH, max_new_tokens: int = 24) -> dict:
    """Exact-match answers to the questions about held-out pictures, asked and answered in `language`."""
    rng = np.random.default_rng(seed)
    cases = []
    for thing in shapes.held_out_things():
        for _ in range(per_thing):
            picture = shapes.draw([thing], rng)
            for kind, answer in shapes.answers([thing], language).items():
                cases.append((kind, picture, language.questions[kind], answer))
    pool = shapes.held_out_things()
    for _ in range(per_thing * 4):  # two-shape pictures: the count question
        a = pool[rng.integers(len(pool))]
        others = [t for t in shapes.train_things() if t.place != a.place]
        b = others[rng.integers(len(others))]
        cases.append(("count", shapes.draw([a, b], rng), language.questions["count"], language.counts[2]))
    got = []
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        got += pipe.understand([[c[1]] for c in chunk], [c[2] for c in chunk], max_new_tokens=max_new_tokens)
    per_kind: dict[str, list[bool]] = {}
    for (kind, _, _, answer), text in zip(cases, got):
        per_kind.setdefault(kind, []).append(text.strip() == answer)
    right = [ok for oks in per_kind.values() for ok in oks]
    return {"accuracy": float(np.mean(right)), "n": len(right),
            "per_question": {k: {"accuracy": float(np.mean(v)), "n": len(v), "chance": CHANCE[k]}
                             for k, v in per_kind.items()},
            "chance": float(np.mean([CHANCE[k] for k, v in per_kind.items() for _ in v]))}


def generation(pipe, cfg: float, per_thing: int = 8, seed: int = 0, image_top_k: int = 2000,
               language: shapes.Language = shapes.ENGLISH) -> dict:
    """Pictures drawn for the held-out descriptions (worded in `language`), judged by the pixel checker."""
    things = shapes.held_out_things()
    pictures = pipe.generate_image([language.text(t) for t in things], size=GEN_SIZE, cfg=cfg, n=per_thing,
                                   seed=seed, image_top_k=image_top_k, progress=False)
    right, per = [], {}
    for thing, pics in zip(things, pictures):
        oks = [shapes.check_picture(p).matches(thing) for p in pics]
        right += oks
        per[language.text(thing)] = float(np.mean(oks))
    return {"cfg": cfg, "accuracy": float(np.mean(right)), "n": len(right), "per_prompt": per,
            "chance": CHANCE["caption"]}, pictures


def save_grid(things, pictures, path: str, scale: int = 2, language: shapes.Language = shapes.ENGLISH) -> None:
    """One row per prompt (its text on the left), its pictures across, each marked by the checker:
    a green bar under a picture it accepts, a red one under one it rejects."""

    side, label = shapes.SIZE * scale, 230
    n = max(len(p) for p in pictures)
    grid = Image.new("RGB", (label + n * (side + 4), len(things) * (side + 10)), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    for r, (thing, pics) in enumerate(zip(things, pictures)):
        y = r * (side + 10)
        d.text((4, y + side // 2 - 6), language.text(thing), fill=(0, 0, 0), font=image_io.label_font())
        for c, p in enumerate(pics):
            x = label + c * (side + 4)
            grid.paste(p.convert("RGB").resize((side, side), Image.NEAREST), (x, y))
            ok = shapes.check_picture(p).matches(thing)
            d.rectangle((x, y + side + 2, x + side - 1, y + side + 6), fill=(40, 170, 60) if ok else (220, 40, 40))
    grid.save(path)


def evaluate(model_dir: str, vq_dir: str, *, continuous: bool = True, grid: str | None = None) -> dict:
    """Understanding and generation (without and with CFG 3) on the held-out combinations."""
    pipe = world_pipeline(model_dir, vq_dir, continuous=continuous)
    results = {"model": model_dir, "continuous": continuous, "understanding": understanding(pipe), "generation": []}
    for cfg in (1.0, 3.0):
        result, pictures = generation(pipe, cfg)
        results["generation"].append(result)
        if grid and cfg == 3.0:
            save_grid(shapes.held_out_things(), [p[:6] for p in pictures], grid)
    return results


def table(runs: dict[str, dict]) -> str:
    """A markdown table: one column per evaluated model, a row per question and per guidance."""
    names = list(runs)
    lines = ["| held-out combinations | " + " | ".join(names) + " | chance |", "|---" * (len(names) + 2) + "|"]
    first = next(iter(runs.values()))
    for kind, per in first["understanding"]["per_question"].items():
        cells = [f"{r['understanding']['per_question'][kind]['accuracy']:.0%}" for r in runs.values()]
        lines.append(f"| understanding: {kind} ({per['n']}) | " + " | ".join(cells) + f" | {per['chance']:.0%} |")
    u = first["understanding"]
    cells = [f"**{r['understanding']['accuracy']:.0%}**" for r in runs.values()]
    lines.append(f"| **understanding, all** ({u['n']}) | " + " | ".join(cells) + f" | {u['chance']:.0%} |")
    for i, g in enumerate(first["generation"]):
        label = "no guidance" if g["cfg"] == 1.0 else f"CFG {g['cfg']:g}"
        cells = [f"{r['generation'][i]['accuracy']:.0%}" for r in runs.values()]
        lines.append(f"| generation, {label} ({g['n']}) | " + " | ".join(cells) + f" | {g['chance']:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m unitoken_jax.world.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--workdir", default=None,
                        help="a `world.build` workdir: evaluates its model and, if built, the discrete-only one")
    parser.add_argument("--model", default=None, help="one model directory (instead of --workdir)")
    parser.add_argument("--vqgan", default=None, help="its VQ-GAN (with --model)")
    parser.add_argument("--out", default=None, help="write the results JSON here (default WORKDIR/results.json)")
    parser.add_argument("--grid", default=None, help="write a picture grid (held-out prompts, CFG 3) here "
                                                     "(default WORKDIR/grid.png)")
    parser.add_argument("--discrete-only", action="store_true", help="--model is an ablation model: no SigLIP features")
    args = parser.parse_args(argv)
    if (args.workdir is None) == (args.model is None) or (args.model is not None and args.vqgan is None):
        parser.error("give --workdir, or --model with --vqgan")
    if args.workdir:
        vq = os.path.join(args.workdir, "vqgan")
        models = {"discrete + continuous": (os.path.join(args.workdir, "stage2", "final"), True),
                  "discrete only": (os.path.join(args.workdir, "stage2_discrete", "final"), False)}
        models = {k: v for k, v in models.items() if os.path.isdir(v[0])}
        if not models:
            parser.error(f"{args.workdir} has no trained model (run python -m unitoken_jax.world.build first)")
        out = args.out or os.path.join(args.workdir, "results.json")
        grid = args.grid or os.path.join(args.workdir, "grid.png")
    else:
        vq, models = args.vqgan, {"model": (args.model, not args.discrete_only)}
        out, grid = args.out, args.grid
        for flag, path in (("--model", args.model), ("--vqgan", args.vqgan)):  # (a traceback from the loader)
            if not os.path.isdir(path):
                parser.error(f"{flag} {path}: no such directory")
    runs = {}
    for i, (name, (model, continuous)) in enumerate(models.items()):
        runs[name] = evaluate(model, vq, continuous=continuous, grid=grid if i == 0 else None)
    print(table(runs))
    if out:
        with open(out, "w") as f:
            json.dump(runs, f, indent=1)
        print(f"results: {out}" + (f", pictures: {grid}" if grid else ""))


if __name__ == "__main__":
    main()
