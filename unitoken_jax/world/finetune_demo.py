"""LoRA teaches the bundled shapes-world model a new skill on a laptop: French.

    python -m unitoken_jax.world.finetune_demo --workdir /tmp/french

The bundled model knows only English ("a red circle at the top left", "What colour is the
shape?"). This draws a small French training set from the world ("un cercle rouge en haut à
gauche", "De quelle couleur est la forme ?" -> "rouge"), pre-tokenizes it with the model's own
tokenizer and VQ-GAN, fine-tunes low-rank adapters on it (`configs/finetune.py`'s LoRA recipe:
the base frozen, only the adapters train), and measures, before and after:

- French, held out: answers to French questions about pictures of the world's held-out
  combinations (exact match), and pictures drawn for French descriptions of them (the world's
  pixel checker), with CFG 3;
- English after: the bundled model's own accuracy tests, to show nothing was forgotten.

The French words are new to the model: its tokenizer has a token for every English word of the
world, but French comes in as byte-level pieces the model never saw. The training items use the
training combinations only; the held-out combinations are never drawn for training.

WORKDIR gets `items_fr/` and `data_fr/` (the French data), `lora/` (the run: TensorBoard,
checkpoints, `final/`, and `adapters/` in PEFT's format), `results.json`, `table.md` and
`grid.png` (French held-out descriptions, drawn after fine-tuning), and `before.json` (the
bundled model's answers before training). Each step is kept and reused by a later run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time

import ml_collections
import numpy as np

import unitoken_jax
from unitoken_jax.configs import finetune
from unitoken_jax.data import pretokenize as pt
from unitoken_jax.data.pipeline import is_held_out
from unitoken_jax.inference.pipeline import UniTokenPipeline
from unitoken_jax.tokenizer.text import TextTokenizer
from unitoken_jax.vq_tokenizer import VQTokenizer
from unitoken_jax.world import build, default, shapes
from unitoken_jax.world import evaluate as world_eval
from unitoken_jax.world.shapes import PATCH, SIGLIP_SIZE, VQ_SIZE, Language

log = logging.getLogger(__name__)

_PLACES_FR = {"top left": "en haut à gauche", "top right": "en haut à droite", "bottom left": "en bas à gauche",
              "bottom right": "en bas à droite"}
FRENCH = Language(
    colours={"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune"},
    shapes={"circle": "cercle", "square": "carré", "triangle": "triangle"},
    places=_PLACES_FR,
    counts={1: "une", 2: "deux", 3: "trois"},  # une forme, deux formes
    thing="un {shape} {colour} {place}",  # cercle, carré, triangle: all masculine
    joiner=" et ",
    questions={"colour": "De quelle couleur est la forme ?", "shape": "Quelle est cette forme ?",
               "place": "Où est la forme ?", "count": "Combien y a-t-il de formes ?", "caption": "Décris l'image."},
    place_questions={"shape_at": "Quelle forme est {place} ?", "colour_at": "De quelle couleur est la forme {place} ?"},
    place_in_question=_PLACES_FR,
)
ANSWER_TOKENS = 64  # French answers are byte-level pieces: "en haut à gauche" is ~17 tokens


def make_data(workdir: str, model_dir: str, pictures: int, language: Language = FRENCH, code: str = "fr",
              seed: int = 10) -> str:
    """`pictures` training scenes worded in `language`, pre-tokenized with the model's tokenizer and
    VQ-GAN into WORKDIR/data_{code}."""
    out = os.path.join(workdir, f"data_{code}")
    made_with = {"pictures": pictures, "seed": seed}
    if build.reuse(out, os.path.exists(os.path.join(out, pt.SETTINGS_FILE)), made_with):
        return out
    items = shapes.write_items(os.path.join(workdir, f"items_{code}"), pictures, seed=seed, language=language,
                               id_prefix=code)
    settings = pt.PretokenizeSettings(name=f"shapes_{code}", vq_size=VQ_SIZE, siglip_size=SIGLIP_SIZE, patch=PATCH,
                                      max_length=None, chunk_size=1024, vq_batch=256)
    pt.pretokenize(items, out, TextTokenizer.from_file(os.path.join(model_dir, "tokenizer.json")),
                   VQTokenizer.from_dir(os.path.join(model_dir, "vqgan")), settings, progress=False)
    build.record(out, made_with)
    return out


def eval_questions(workdir: str) -> tuple[tuple[str, str], ...]:
    """Two pictures of held-out combinations written to WORKDIR/eval_pictures, each with a French
    question: what the run answers at every evaluation (TensorBoard's text tab)."""
    folder = os.path.join(workdir, "eval_pictures")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(5)
    out = []
    for thing, kind in zip(shapes.held_out_things()[:2], ("colour", "place")):
        path = os.path.join(folder, f"{kind}.png")
        shapes.draw([thing], rng).save(path)
        out.append((path, FRENCH.questions[kind]))
    return tuple(out)


HOLDOUT = 0.05  # of the samples, by sample id: the run's held-out losses (never trained on)


def check_held_out(pictures: int, english_pictures: int) -> None:
    """A `SettingsError` where the data's samples (`make_data`'s ids: fru0, frg0, ... enu0, ...) hold
    out no question or no drawing for the run's evaluation, naming the fewest French pictures that
    do (with 20 pictures training stopped with a traceback, after a minute of measuring)."""
    def first(code: str, kind: str, count: int) -> int | None:  # the first of its ids held out, if any
        return next((i for i in range(count) if is_held_out(f"{code}{kind}{i}", HOLDOUT)), None)

    lacking = [(kind, name) for kind, name in (("u", "question"), ("g", "drawing"))
               if first("fr", kind, pictures) is None and first("en", kind, english_pictures) is None]
    if lacking:
        enough = max(first("fr", kind, 10**6) for kind, _ in lacking) + 1
        raise build.SettingsError(
            f"--pictures {pictures} with --english-pictures {english_pictures} hold out no "
            f"{' and no '.join(name for _, name in lacking)} for the run's evaluation ({HOLDOUT:.0%} of the "
            f"samples, by sample id); give --pictures {enough} or more")


def lora_config(data: tuple[str, ...], base: str, steps: int, rank: int, learning_rate: float,
                questions: tuple[tuple[str, str], ...] = ()) -> ml_collections.ConfigDict:
    """configs/finetune.py's LoRA recipe (tiny variant) on the bundled model and the French data,
    evaluated every 100 steps: held-out losses on 5 % of the data (by sample id, never trained on),
    four held-out French descriptions drawn, `questions` answered."""
    c = finetune.get_config("tiny")
    c.model_name = "shapes_world"
    model = unitoken_jax.read_config(base).to_dict()
    model["decoder"]["dropout"] = 0.0
    model["param_dtype"] = "float32"
    model["lora"] = dict(rank=rank, alpha=2.0 * rank, dropout=0.0,
                         targets=finetune.LORA_TARGETS + ("lm_head",))  # the head: French answers are new tokens
    c.model = ml_collections.ConfigDict(model)
    c.init_from.update(kind="checkpoint", paths=(base,))
    c.optimizer.update(learning_rate=learning_rate, warmup_fraction=0.05)
    c.data.update(sources=tuple(data), demo=False, max_images=32, seed=0, num_threads=2)
    c.mesh.num_devices = 1
    c.update(total_steps=steps, log_every=25, checkpoint_every=min(steps, build.CHECKPOINT_EVERY), keep_checkpoints=1,
             log_sample_ids=False)
    c.eval.update(every=100, holdout_fraction=HOLDOUT, batches=2,
                  prompts=tuple(FRENCH.text(t) for t in shapes.held_out_things()[:4]), questions=questions,
                  tokenizer=os.path.join(default.DEFAULT_DIR, "tokenizer.json"),
                  vqgan=os.path.join(default.DEFAULT_DIR, "vqgan"), size=shapes.SIZE, max_new_tokens=ANSWER_TOKENS,
                  template=shapes.GENERATE_TEMPLATE)  # (the prompt the model learned to draw from)
    return c


def pipeline(model) -> UniTokenPipeline:
    s = default.settings()
    return UniTokenPipeline(model, TextTokenizer.from_file(os.path.join(default.DEFAULT_DIR, "tokenizer.json")),
                            VQTokenizer.from_dir(os.path.join(default.DEFAULT_DIR, "vqgan")), vq_size=s["vq_size"],
                            image_prefix=s["image_prefix"], generate_template=shapes.GENERATE_TEMPLATE)


def measure(model, english: bool, per_thing: int = 4) -> dict:
    """French (and with `english`, English) held-out answers and CFG-3 drawings of `model`."""
    pipe = pipeline(model)
    out = {"french": {"understanding": world_eval.understanding(pipe, per_thing=per_thing, language=FRENCH,
                                                                  max_new_tokens=ANSWER_TOKENS),
                      "generation": world_eval.generation(pipe, 3.0, per_thing=2 * per_thing, language=FRENCH)[0]}}
    if english:
        out["english"] = {"understanding": world_eval.understanding(pipe, per_thing=per_thing),
                          "generation": world_eval.generation(pipe, 3.0, per_thing=2 * per_thing)[0]}
    return out


BEFORE = "before.json"  # the bundled model's answers before training, and what they were measured with


def _measured_before(workdir: str, base: str, per_thing: int, timings: dict) -> dict:
    """The base model's answers before training: measured once a WORKDIR (a minute on the whole
    demo) and kept in `before.json`, which a resumed or repeated run reads back; a different model
    (its files' hash) or `per_thing` is measured again."""
    path = os.path.join(workdir, BEFORE)
    key = {"per_thing": per_thing, "model": _files_hash(base)}
    try:
        with open(path) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        kept = {}
    if kept.get("measured_with") == key and "results" in kept:
        log.info("reusing the base model's answers measured before training (%s)", path)
        timings["measure_before"] = kept.get("seconds", 0.0)
        return kept["results"]
    t = time.time()
    before = measure(unitoken_jax.load(base, progress=False), english=True, per_thing=per_thing)
    timings["measure_before"] = time.time() - t
    with open(path + ".tmp", "w") as f:
        json.dump({"measured_with": key, "seconds": timings["measure_before"], "results": before}, f, indent=1)
    os.replace(path + ".tmp", path)
    return before


def _files_hash(folder: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            digest.update(os.path.relpath(os.path.join(root, name), folder).encode())
            with open(os.path.join(root, name), "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def table(before: dict, after: dict) -> str:
    rows = ["| held-out combinations | before LoRA | after LoRA | chance |", "|---|---|---|---|"]
    for lang in ("french", "english"):
        for kind in ("understanding", "generation"):
            a = after[lang][kind]
            b = before.get(lang, {}).get(kind)
            label = {"understanding": "answers (exact)", "generation": "drawings (pixel checker, CFG 3)"}[kind]
            rows.append(f"| {lang.capitalize()} {label} ({a['n']}) | {b['accuracy']:.0%} | **{a['accuracy']:.0%}** | "
                        f"{a['chance']:.0%} |" if b else
                        f"| {lang.capitalize()} {label} ({a['n']}) | (bundled: see README) | **{a['accuracy']:.0%}** | "
                        f"{a['chance']:.0%} |")
    return "\n".join(rows)


def run(workdir: str, *, pictures: int = 2000, english_pictures: int = 600, steps: int = 700, rank: int = 16,
        learning_rate: float = 3e-3, per_thing: int = 4) -> dict:
    """The whole demo (each step reused when WORKDIR has it); returns the results. `per_thing`:
    evaluation pictures per held-out combination (questions; twice as many drawings)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):  # (makedirs' FileExistsError traceback)
        raise build.SettingsError(f"--workdir {workdir} is a file; give a directory")
    check_held_out(pictures, english_pictures)
    os.makedirs(workdir, exist_ok=True)
    base = os.path.join(default.DEFAULT_DIR, "model")
    timings = {}
    t = time.time()
    data = [make_data(workdir, default.DEFAULT_DIR, pictures)]
    if english_pictures:  # a little English in the mix, so that the adapters do not overwrite it
        data.append(make_data(workdir, default.DEFAULT_DIR, english_pictures, shapes.ENGLISH, "en", seed=11))
    timings["french_data"] = time.time() - t

    run_dir = os.path.join(workdir, "lora")
    # (adapters trained with other settings are refused, not reported as these: delete lora/ to train again;
    # said before the measurements, not a minute into them)
    trained_with = {"steps": steps, "rank": rank, "learning_rate": learning_rate, "pictures": pictures,
                    "english_pictures": english_pictures}
    trained = build.reuse(run_dir, os.path.isdir(os.path.join(run_dir, "adapters")), trained_with)

    before = _measured_before(workdir, base, per_thing, timings)
    log.info("before: French answers %.0f%%, drawings %.0f%%", 100 * before["french"]["understanding"]["accuracy"],
             100 * before["french"]["generation"]["accuracy"])

    t = time.time()
    if not trained:
        build.train(lora_config(data, base, steps, rank, learning_rate, eval_questions(workdir)), run_dir)
        build.record(run_dir, trained_with)
    timings["lora_training"] = time.time() - t

    t = time.time()
    tuned = unitoken_jax.load(base, adapters=os.path.join(run_dir, "adapters"), progress=False)
    after = measure(tuned, english=True, per_thing=per_thing)
    timings["measure_after"] = time.time() - t
    things = shapes.held_out_things()
    pictures_fr = pipeline(tuned).generate_image([FRENCH.text(t) for t in things], size=shapes.GEN_SIZE, cfg=3.0,
                                                 n=6, seed=100, progress=False)
    world_eval.save_grid(things, pictures_fr, os.path.join(workdir, "grid.png"), language=FRENCH)

    results = {"before": before, "after": after, "timings_s": timings,
               "settings": {"pictures": pictures, "english_pictures": english_pictures, "steps": steps, "rank": rank,
                            "learning_rate": learning_rate}}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table(before, after) + "\n")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m unitoken_jax.world.finetune_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--pictures", type=build.count(), default=2000,
                        help="French training pictures (two items each)")
    parser.add_argument("--english-pictures", type=build.count(0), default=600,
                        help="English training pictures mixed in (replay: English stays as it was)")
    parser.add_argument("--steps", type=build.count(), default=700)
    parser.add_argument("--rank", type=build.count(), default=16)
    parser.add_argument("--learning-rate", type=build.positive, default=3e-3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)  # (Orbax's checkpoint chatter: 235 of 261 lines)
    results = build.script(parser, argv is None, lambda: run(
        args.workdir, pictures=args.pictures, english_pictures=args.english_pictures, steps=args.steps,
        rank=args.rank, learning_rate=args.learning_rate))
    print(table(results["before"], results["after"]))
    print(f"results: {os.path.join(args.workdir, 'results.json')}, pictures: {os.path.join(args.workdir, 'grid.png')}")


if __name__ == "__main__":
    main()
