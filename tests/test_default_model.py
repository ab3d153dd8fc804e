"""The bundled shapes-world model: it loads from the package, and the CLI uses it when no model is
named. Its accuracy is a regression check on fixed held-out cases (every held-out combination,
one picture or drawing each; the expected answers come from the world, not from the model). The
bundled model is a first run: colour, place and count are read well, shape on held-out
combinations and drawing held-out prompts are still far below issue 6's targets (README); the
thresholds below guard what it does now."""

import numpy as np
import pytest

from unitoken_jax.world import default, shapes


@pytest.fixture(scope="module")
def pipe():
    return default.pipeline()


def test_it_answers_about_held_out_pictures(pipe):
    rng = np.random.default_rng(123)
    things = shapes.held_out_things()
    pictures = [shapes.draw([t], rng) for t in things]
    right = {}
    for kind in ("colour", "shape", "place"):
        got = pipe.understand([[p] for p in pictures], [shapes.QUESTIONS[kind]] * len(things), max_new_tokens=24)
        vocabulary = {"colour": shapes.COLOURS, "shape": shapes.SHAPES, "place": shapes.PLACES}[kind]
        assert all(g.strip() in vocabulary for g in got), got  # always an answer of the right kind
        right[kind] = sum(g.strip() == getattr(t, kind) for g, t in zip(got, things))
    assert right["colour"] >= 7 and right["place"] >= 7, right  # of 8; chance is 2 of 8
    assert right["shape"] >= 3, right  # chance: 8 / 3


def test_it_draws_held_out_prompts_better_than_chance(pipe):
    things = shapes.held_out_things()
    pictures = pipe.generate_image([t.text for t in things], size=(64, 64), cfg=3.0, n=2, seed=0, progress=False)
    assert all(p.size == (32, 32) for pics in pictures for p in pics)
    right = sum(shapes.check_picture(p).matches(t) for pics, t in zip(pictures, things) for p in pics)
    colour = sum(shapes.check_picture(p).colour == t.colour for pics, t in zip(pictures, things) for p in pics)
    assert right >= 2 and colour >= 8, (right, colour)  # of 16; chance: 1/3 and 4


def test_the_cli_needs_no_model_arguments(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from unitoken_jax.cli import main

    for var in ("UNITOKEN_MODEL", "UNITOKEN_TOKENIZER", "UNITOKEN_VQGAN"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "red.png"
    assert main(["generate", "a red circle at the top left", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    shapes.draw([shapes.Thing("green", "triangle", "bottom right")]).save(tmp_path / "picture.png")
    assert main(["understand", str(tmp_path / "picture.png"), "What colour is the shape?"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "green"
