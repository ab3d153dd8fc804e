"""The French LoRA demo (unitoken_jax.world.finetune_demo): its French items say in French, word for
word, what the picture shows (checked against a hand-written phrasebook, not the demo's tables);
the held-out combinations never reach them; and a short run of the whole demo writes its results,
table and picture grid. (Its accuracy figures come from the full run, quoted in the README.)"""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from unitoken_jax.world import finetune_demo, shapes

# written out by hand, independently of finetune_demo.FRENCH
PHRASEBOOK = {
    ("red", "circle", "top left"): "un cercle rouge en haut à gauche",
    ("blue", "square", "bottom right"): "un carré bleu en bas à droite",
    ("yellow", "triangle", "top right"): "un triangle jaune en haut à droite",
    ("green", "square", "bottom left"): "un carré vert en bas à gauche",
}
QUESTIONS = {"De quelle couleur est la forme ?": "colour", "Quelle est cette forme ?": "shape",
             "Où est la forme ?": "place", "Combien y a-t-il de formes ?": "count", "Décris l'image.": "caption"}
WORDS = {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "circle": "cercle", "square": "carré",
         "triangle": "triangle", "top left": "en haut à gauche", "top right": "en haut à droite",
         "bottom left": "en bas à gauche", "bottom right": "en bas à droite"}


def test_french_descriptions_match_the_phrasebook():
    for (colour, shape, place), text in PHRASEBOOK.items():
        assert finetune_demo.FRENCH.text(shapes.Thing(colour, shape, place)) == text
    two = [shapes.Thing("blue", "square", "bottom right"), shapes.Thing("red", "circle", "top left")]
    assert shapes.caption(two, finetune_demo.FRENCH) == ("un cercle rouge en haut à gauche et un carré bleu en bas "
                                                         "à droite")


def test_french_items_answer_in_french_and_leave_out_the_held_out_combinations(tmp_path):
    items = json.load(open(shapes.write_items(str(tmp_path), 120, seed=3, language=finetune_demo.FRENCH,
                                              id_prefix="fr")))
    held = {(t.colour, t.shape, t.place) for t in shapes.held_out_things()}
    assert all(it["id"].startswith(("fru", "frg")) for it in items)
    asked = 0
    for it in items:
        things = [shapes.Thing(**t) for t in it["things"]]
        assert not {(t.colour, t.shape, t.place) for t in things} & held
        order = sorted(things, key=lambda t: list(shapes.PLACES).index(t.place))
        french = " et ".join(f"un {WORDS[t.shape]} {WORDS[t.colour]} {WORDS[t.place]}" for t in order)
        turns = [m["value"] for m in it["conversations"]]
        if it["id"].startswith("frg"):
            assert turns[0].endswith("\n" + french) and turns[1] == "<|image|>"
            continue
        for question, answer in zip([q.replace("<|image|>\n", "") for q in turns[0::2]], turns[1::2]):
            asked += 1
            kind = QUESTIONS.get(question)
            if kind == "count":
                assert answer == ["une", "deux", "trois"][len(things) - 1]
            elif kind == "caption":
                assert answer == french
            elif kind is not None:
                assert len(things) == 1 and answer == WORDS[getattr(things[0], kind)]
            else:  # about one place: "Quelle forme est en haut à gauche ?" / "De quelle couleur est la forme ... ?"
                (t,) = [t for t in things if question.endswith(f" {WORDS[t.place]} ?")]
                assert answer == WORDS[t.shape if question.startswith("Quelle forme") else t.colour]
    assert asked > 300


def test_a_short_demo_run_writes_results_table_and_grid(tmp_path, monkeypatch, caplog):
    from unitoken_jax.world import build

    # a run stopped part way (stop_after as a SIGTERM would: its step saved, and the loop returns as
    # at its end) is said as stopped; it had recorded its settings and failed on adapters never written
    make_config = finetune_demo.lora_config
    monkeypatch.setattr(finetune_demo, "lora_config", lambda *a, **k: _stopping_at(make_config(*a, **k), 3))
    with pytest.raises(build.Stopped, match="stopped before its end .* run the same command again"):
        finetune_demo.run(str(tmp_path), pictures=40, english_pictures=16, steps=6, rank=4, per_thing=1)
    assert not (tmp_path / "lora" / build.SETTINGS).exists() and (tmp_path / "lora" / "checkpoints" / "3").is_dir()
    monkeypatch.undo()
    # and the same run goes on from step 3; the bundled model's answers before training, measured by
    # the stopped run, are read back (each resume of the whole demo measured them again: a minute)
    measured, real_measure = [], finetune_demo.measure
    monkeypatch.setattr(finetune_demo, "measure", lambda *a, **k: measured.append(a[0]) or real_measure(*a, **k))
    with caplog.at_level(logging.INFO, logger="unitoken_jax"):
        results = finetune_demo.run(str(tmp_path), pictures=40, english_pictures=16, steps=6, rank=4, per_thing=1)
    assert "resumed from step 3" in caplog.text and "reusing the base model's answers" in caplog.text, caplog.text
    assert len(measured) == 1  # the tuned model alone
    assert json.load(open(tmp_path / finetune_demo.BEFORE))["results"] == results["before"]
    monkeypatch.undo()
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["settings"]["steps"] == 6
    for when in ("before", "after"):
        for lang in ("french", "english"):
            for kind in ("understanding", "generation"):
                assert 0.0 <= results[when][lang][kind]["accuracy"] <= 1.0
    # before any fine-tuning the bundled model answers no French question right
    assert results["before"]["french"]["understanding"]["accuracy"] < 0.2
    assert (tmp_path / "lora" / "adapters" / "adapter_model.safetensors").exists()
    # evaluation during the run: at its last step, the held-out French prompts drawn
    assert Image.open(tmp_path / "lora" / "samples" / "step_6.png").size[0] > 4 * shapes.SIZE
    table = (tmp_path / "table.md").read_text()
    assert "French answers" in table and "English drawings" in table
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[1] >= 8 * shapes.SIZE and np.asarray(grid).std() > 0
    # a rerun with other settings is refused by name (it reused the adapters trained for 6 steps at
    # rank 4 and wrote steps 8, rank 8 into results.json)
    def not_yet(*args, **kwargs):
        raise AssertionError("measured before the settings were checked")

    monkeypatch.setattr(finetune_demo, "measure", not_yet)  # (a minute of the bundled model's answers first)
    with pytest.raises(build.SettingsError, match="lora was made with steps 6 .now 8., rank 4 .now 8.; delete it"):
        finetune_demo.run(str(tmp_path), pictures=40, english_pictures=16, steps=8, rank=8, per_thing=1)
    with pytest.raises(build.SettingsError, match="data_fr was made with pictures 40 .now 80."):
        finetune_demo.run(str(tmp_path), pictures=80, english_pictures=16, steps=6, rank=4, per_thing=1)


def _stopping_at(config, step):
    config.stop_after = step
    return config
