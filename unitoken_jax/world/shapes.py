"""The shapes world: 64 x 64 pictures of one to three coloured shapes in the quadrants, with
captions, questions with one-word-or-phrase answers, and text-to-image prompts.

Small enough to train UniToken on two CPU cores, rich enough to check both directions: the
model must read colour, shape, position and count from a picture, and draw a named shape in a
named colour at a named place. Some (colour, shape, position) combinations never appear in
training (`HELD_OUT`): the evaluation asks about them and asks for them.

Scenes with several shapes, captions that name each of them, and questions about one place
("What shape is at the top left?") make colour, shape and place vary independently in training,
so that reading and drawing them separately pays off; the held-out combinations then test
whether the model composes them. The evaluation asks only the five single-shape questions of
`QUESTIONS` (and the count of two-shape pictures).

`check_picture` reads a picture's colour, shape and position from pixel statistics alone (no
model): the non-background pixels' mean colour, how they fill the corners of their bounding box
(a square fills all four, a triangle only the bottom two, a circle none) and their centroid's
quadrant.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Iterator

import numpy as np
from PIL import Image

# the table and the brush are shared with the demo data; they are part of this module's API too
from unitoken_jax.data.drawing import (  # noqa: F401
    BACKGROUND,
    COLOURS,
    PLACES,
    SHAPES,
    SIZE,
    Thing,
    draw,
)
from unitoken_jax.models.vqgan import VQGANConfig
from unitoken_jax.tokenizer import small

COUNTS = {1: "one", 2: "two", 3: "three"}
SCENE_SIZES = {1: 0.4, 2: 0.35, 3: 0.25}  # how many shapes a training picture has
# Never drawn in training; the held-out evaluation uses exactly these.
HELD_OUT = (("red", "triangle", "bottom right"), ("green", "circle", "top left"), ("blue", "square", "top right"),
            ("yellow", "triangle", "bottom left"), ("red", "square", "top left"), ("green", "square", "bottom right"),
            ("blue", "circle", "bottom left"), ("yellow", "circle", "top right"))
GENERATE_TEMPLATE = "Generate an image of {w}x{h} according to the following prompt:\n{prompt}"  # (Lumina-mGPT's)
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is this?",
    "place": "Where is the shape?",
    "count": "How many shapes are there?",
    "caption": "Describe the picture.",
}
PLACE_QUESTIONS = {  # about the shape at one place, for pictures with any number of shapes
    "shape_at": "What shape is at the {place}?",
    "colour_at": "What colour is the shape at the {place}?",
}


def all_things() -> list[Thing]:
    return [Thing(*t) for t in itertools.product(COLOURS, SHAPES, PLACES)]


def train_things() -> list[Thing]:
    return [t for t in all_things() if (t.colour, t.shape, t.place) not in HELD_OUT]


def held_out_things() -> list[Thing]:
    return [Thing(*t) for t in HELD_OUT]


@dataclasses.dataclass(frozen=True)
class Language:
    """How the world's texts are worded: its words for colours, shapes, places and counts, how a
    shape is described, and its questions. `ENGLISH` is the world's own (what the bundled model was
    trained on); `unitoken_jax.world.finetune_demo` adds French."""

    colours: dict[str, str]
    shapes: dict[str, str]
    places: dict[str, str]  # the place words as a description and an answer use them
    counts: dict[int, str]
    thing: str  # "a {colour} {shape} at the {place}"
    joiner: str  # between the shapes of a caption
    questions: dict[str, str]  # the keys of `QUESTIONS`
    place_questions: dict[str, str]  # the keys of `PLACE_QUESTIONS`, with a {place}
    place_in_question: dict[str, str]  # a place as the place questions say it

    def text(self, t: Thing) -> str:
        return self.thing.format(colour=self.colours[t.colour], shape=self.shapes[t.shape], place=self.places[t.place])


ENGLISH = Language(colours={c: c for c in COLOURS}, shapes={s: s for s in SHAPES}, places={p: p for p in PLACES},
                   counts=COUNTS, thing="a {colour} {shape} at the {place}", joiner=" and ", questions=QUESTIONS,
                   place_questions=PLACE_QUESTIONS, place_in_question={p: p for p in PLACES})


def caption(things: list[Thing], language: Language = ENGLISH) -> str:
    """'a red circle at the top left and a blue square at the bottom right' (in reading order)."""
    order = list(PLACES)
    return language.joiner.join(language.text(t) for t in sorted(things, key=lambda t: order.index(t.place)))


def answers(things: list[Thing], language: Language = ENGLISH) -> dict[str, str]:
    """The exact-match answer to every question of `QUESTIONS` that has one for this picture."""
    out = {"count": language.counts[len(things)], "caption": caption(things, language)}
    if len(things) == 1:
        t = things[0]
        out.update(colour=language.colours[t.colour], shape=language.shapes[t.shape], place=language.places[t.place])
    return out


def questions_and_answers(things: list[Thing], language: Language = ENGLISH) -> list[tuple[str, str]]:
    """Every (question, answer) this picture has: `QUESTIONS` and, per shape, `PLACE_QUESTIONS`."""
    qa = [(language.questions[k], a) for k, a in answers(things, language).items()]
    for t in things:
        where = language.place_in_question[t.place]
        qa.append((language.place_questions["shape_at"].format(place=where), language.shapes[t.shape]))
        qa.append((language.place_questions["colour_at"].format(place=where), language.colours[t.colour]))
    return qa


def generate_prompt(thing_or_things, language: Language = ENGLISH) -> str:
    things = [thing_or_things] if isinstance(thing_or_things, Thing) else list(thing_or_things)
    return GENERATE_TEMPLATE.format(w=SIZE, h=SIZE, prompt=caption(things, language))


def scene(rng: np.random.Generator, pool: list[Thing]) -> list[Thing]:
    """One to three things of `pool` (`SCENE_SIZES`) at distinct places."""
    k = int(rng.choice(list(SCENE_SIZES), p=list(SCENE_SIZES.values())))
    first = pool[rng.integers(len(pool))]
    things = [first]
    for place in rng.permutation([p for p in PLACES if p != first.place])[:k - 1]:
        here = [t for t in pool if t.place == place]
        things.append(here[rng.integers(len(here))])
    return things


def write_items(directory: str, n_pictures: int, *, seed: int = 0, held_out: bool = False,
                generation: bool = True, questions_per_item: int = 3, language: Language = ENGLISH,
                id_prefix: str = "") -> str:
    """Draws `n_pictures` scenes from the training (or held-out) combinations into `directory` and
    writes `items.json`: per picture one understanding item (a conversation of
    `questions_per_item` different questions about it), and one generation item (its caption ->
    the picture), worded in `language`, ids prefixed by `id_prefix`. Returns the JSON path."""
    rng = np.random.default_rng(seed)
    pool = held_out_things() if held_out else train_things()
    os.makedirs(directory, exist_ok=True)
    items = []
    for i in range(n_pictures):
        things = scene(rng, pool)
        name = f"{i:05d}.png"
        draw(things, rng).save(os.path.join(directory, name))
        qa = questions_and_answers(things, language)
        chosen = rng.choice(len(qa), min(questions_per_item, len(qa)), replace=False)
        conversation = []
        for j, q in enumerate(chosen):
            question, answer = qa[q]
            conversation += [{"from": "human", "value": f"<|image|>\n{question}" if j == 0 else question},
                             {"from": "gpt", "value": answer}]
        described = [dataclasses.asdict(t) for t in things]
        items.append({"id": f"{id_prefix}u{i}", "image": [name], "things": described, "conversations": conversation})
        if generation:
            items.append({"id": f"{id_prefix}g{i}", "image": [name], "things": described,
                          "conversations": [{"from": "human", "value": generate_prompt(things, language)},
                                            {"from": "gpt", "value": "<|image|>"}]})
    path = os.path.join(directory, "items.json")
    with open(path, "w") as f:
        json.dump(items, f)
    return path


def corpus() -> list[str]:
    """Every text the world's items and evaluation can contain (for its tokenizer)."""
    texts = list(QUESTIONS.values()) + list(COUNTS.values())
    for place in PLACES:
        texts += [q.format(place=place) for q in PLACE_QUESTIONS.values()]
    texts += [generate_prompt(t) for t in all_things()] + [t.text for t in all_things()]
    for a, b in itertools.combinations(all_things(), 2):
        if a.place != b.place:
            texts.append(generate_prompt([a, b]))
    return texts


# --- the pixel checker ---------------------------------------------------------------------------
@dataclasses.dataclass
class Reading:
    colour: str | None
    shape: str | None
    place: str | None
    pixels: int  # non-background pixels

    def matches(self, thing: Thing) -> bool:
        return (self.colour, self.shape, self.place) == (thing.colour, thing.shape, thing.place)


SPECK = 8  # foreground pieces this small (a decoder's stray pixels) are no shape
MOST_SIDE = 40  # a shape's bounding box at most (drawn: 23 to 29 px a side, within its quarter)


def check_picture(image: Image.Image) -> Reading:
    """Colour, shape and place of the one shape in `image`, from pixel statistics alone. A picture
    whose foreground is not one shape — several pieces, one larger than a shape can be, or most
    of its pixels far from any one colour — reads as nothing (colour, shape and place None)."""
    from scipy import ndimage

    x = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), np.float32)
    fg = np.abs(x - np.array(BACKGROUND, np.float32)).sum(-1) > 120
    n = int(fg.sum())
    if n < 30:
        return Reading(None, None, None, n)
    pieces, count = ndimage.label(fg, structure=np.ones((3, 3)))
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
    if int((sizes >= SPECK).sum()) != 1:
        return Reading(None, None, None, n)
    fg = pieces == 1 + int(np.argmax(sizes))
    mean = x[fg].mean(0)
    colour = min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - mean) ** 2)))
    near = np.abs(x[fg] - np.array(COLOURS[colour], np.float32)).sum(-1) < 150
    ys, xs = np.nonzero(fg)
    if near.mean() < 0.6 or ys.max() - ys.min() >= MOST_SIDE or xs.max() - xs.min() >= MOST_SIDE:
        return Reading(None, None, None, n)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    inside = fg[y0:y1, x0:x1]
    ch, cw = max(1, round(0.3 * (y1 - y0))), max(1, round(0.3 * (x1 - x0)))
    top = (inside[:ch, :cw].mean() + inside[:ch, -cw:].mean()) / 2
    bottom = (inside[-ch:, :cw].mean() + inside[-ch:, -cw:].mean()) / 2
    # corners of the bounding box: a square fills all four, a triangle (apex up) only the bottom
    # two, a circle none of them well
    shape = "square" if min(top, bottom) > 0.6 else ("triangle" if bottom - top > 0.25 else "circle")
    cy, cx = ys.mean() / SIZE, xs.mean() / SIZE
    place = ("top" if cy < 0.5 else "bottom") + " " + ("left" if cx < 0.5 else "right")
    return Reading(colour, shape, place, n)


def iter_pictures(things: list[Thing], per_thing: int, seed: int) -> Iterator[tuple[Thing, Image.Image]]:
    rng = np.random.default_rng(seed)
    for t in things:
        for _ in range(per_thing):
            yield t, draw([t], rng)


# --- the world's tokenizers and sizes (what the bundled model was built with) -----------------
VQ_SIZE = 64  # the whole 64 x 64 picture; 16x downsampling (as Chameleon's VQ-GAN) gives 4 x 4 codes
SIGLIP_SIZE = 64
PATCH = 16  # 4 x 4 = 16 SigLIP features per picture
GEN_SIZE = (SIZE, SIZE)  # 64 px = two 32-px grid units of the layout = 4 x 4 codes
VQ_CONFIG = VQGANConfig(ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=32, embed_dim=16, n_embed=256,
                        mid_attention=False)
MAX_MERGES = 600  # more than the world's words need: the trainer stops when every word is one token


@functools.cache
def _merges() -> tuple[tuple[str, str], ...]:
    return tuple(small.learn_merges(corpus(), MAX_MERGES))


def tokenizer_json() -> str:
    """The world's tokenizer: Chameleon's layout (`tokenizer.small`) with BPE merges learned from
    every text of the world, so that each word is one token."""
    return small.build(merges=_merges())


def vocab_size() -> int:
    """The world tokenizer's ids, rounded up to a multiple of 128 for the model's embeddings."""
    return -(-small.vocab_size(_merges()) // 128) * 128
