"""The shapes world (issue 6 groundwork): the pixel checker reads every clean picture right and
refuses an empty one; held-out combinations never reach the training items, whose answers are
what the pictures show; the world's tokenizer makes every word one token and is the same in every
process; the VQ-GAN trainer learns the pictures and its saved tokenizer gives the same codes after
loading."""

import json
import re

import numpy as np
from PIL import Image

from unitoken_jax.models.vqgan import VQGANConfig
from unitoken_jax.tokenizer import images as image_io
from unitoken_jax.vq_tokenizer import VQTokenizer
from unitoken_jax.convert.vqgan import save_vqgan
from unitoken_jax.train.vqgan import VQTrainConfig, train_vqgan
from unitoken_jax.world import shapes


def test_the_checker_reads_every_clean_picture_and_refuses_an_empty_one():
    readings = [(t, shapes.check_picture(im)) for t, im in shapes.iter_pictures(shapes.all_things(), 3, seed=0)]
    assert len(readings) == 48 * 3
    assert all(r.matches(t) for t, r in readings)
    empty = shapes.check_picture(Image.new("RGB", (64, 64), shapes.BACKGROUND))
    assert empty.colour is None and not empty.matches(shapes.Thing("red", "circle", "top left"))
    wrong = shapes.check_picture(shapes.draw([shapes.Thing("blue", "square", "top left")]))
    assert not wrong.matches(shapes.Thing("blue", "circle", "top left"))
    # a picture that is not one shape reads as nothing (it read as one of its shapes, a canvas of one
    # colour as a square at the top left: a drawing of several shapes or a flood counted as right)
    import itertools

    for scene in itertools.chain(itertools.combinations(shapes.all_things(), 2),
                                 itertools.combinations(shapes.all_things(), 3)):
        if len({t.place for t in scene}) == len(scene):
            assert shapes.check_picture(shapes.draw(list(scene))).colour is None, scene
    for colour in shapes.COLOURS.values():
        assert shapes.check_picture(Image.new("RGB", (64, 64), colour)).colour is None


def test_held_out_combinations_never_reach_training_items(tmp_path):
    held = {(t.colour, t.shape, t.place) for t in shapes.held_out_things()}
    assert len(held) == 8 and len(shapes.train_things()) == 40
    items = json.load(open(shapes.write_items(str(tmp_path / "train"), 300, seed=1)))
    seen = {(t["colour"], t["shape"], t["place"]) for it in items for t in it["things"]}
    assert not seen & held and len(seen) == 40
    sizes = {len(it["things"]) for it in items}
    assert sizes == {1, 2, 3}
    checked = 0
    for it in items:
        things = [shapes.Thing(**t) for t in it["things"]]
        assert len({t.place for t in things}) == len(things)  # one shape per place
        turns = [m["value"] for m in it["conversations"]]
        if it["id"].startswith("g"):
            assert turns == [shapes.generate_prompt(things), "<|image|>"]
            continue
        assert turns[0].startswith("<|image|>\n") and "<|image|>" not in "".join(turns[1:])
        asked = [q.replace("<|image|>\n", "") for q in turns[0::2]]
        assert len(set(asked)) == len(asked) == 3  # three different questions
        for question, answer in zip(asked, turns[1::2]):
            # the answer, derived here from the item's things and the question's own words
            if question == shapes.QUESTIONS["count"]:
                assert answer == ["one", "two", "three"][len(things) - 1]
            elif question == shapes.QUESTIONS["caption"]:
                assert answer == " and ".join(t.text for t in sorted(things, key=lambda t: list(shapes.PLACES)
                                                                                    .index(t.place)))
            elif "at the" in question:
                (t,) = [t for t in things if question.endswith(f"at the {t.place}?")]
                assert answer == (t.shape if question.startswith("What shape") else t.colour)
            else:
                assert len(things) == 1
                kind = {v: k for k, v in shapes.QUESTIONS.items()}[question]
                assert answer == getattr(things[0], kind)
        if len(things) == 1:  # the drawn picture shows what the item says
            picture = Image.open(tmp_path / "train" / it["image"][0])
            assert shapes.check_picture(picture).matches(things[0])
            checked += 1
    assert checked > 50
    test = json.load(open(shapes.write_items(str(tmp_path / "test"), 40, seed=2, held_out=True)))
    assert {(t["colour"], t["shape"], t["place"]) for it in test for t in it["things"]} <= held


def test_the_world_tokenizer_makes_every_word_one_token_in_every_process():
    import subprocess
    import sys

    from unitoken_jax.tokenizer.text import TextTokenizer
    from unitoken_jax.world import build

    text = build.tokenizer_json()
    tok = TextTokenizer(text)
    for sentence in shapes.corpus():
        words = sentence.replace("\n", " ").split(" ")
        ids = tok.encode_text(sentence)
        assert tok.decode_text(ids) == sentence
        # every word is exactly one token: the tokens that hold letters are the words, in order
        pieces = [tok.decode_text([i]) for i in ids]
        assert [p.strip() for p in pieces if any(c.isalpha() for c in p)] == re.findall(r"[A-Za-z]+", sentence), \
            (sentence, pieces)
        assert len(words) <= len(ids)
    assert len(tok.encode_text("a yellow triangle at the bottom right")) == 7
    assert tok.vocab_size <= build.vocab_size() < tok.vocab_size + 128
    code = "from unitoken_jax.world import build; import sys; sys.stdout.write(build.tokenizer_json())"
    for seed in ("1", "2"):
        env = dict(__import__("os").environ, PYTHONHASHSEED=seed)
        assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout == text


def test_vq_trainer_learns_the_pictures_and_the_saved_tokenizer_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    pictures = np.stack([image_io.vq_pixels(image_io.vq_crop(shapes.draw(shapes.scene(rng, shapes.train_things()),
                                                                         rng), 16)) for _ in range(64)])
    config = VQGANConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=4, n_embed=32,
                         mid_attention=False)
    params, history = train_vqgan(config, pictures, VQTrainConfig(steps=120, batch=16, learning_rate=3e-3,
                                                                 restart_every=40), progress=False)
    (_, first_loss, first_l1, _), (_, last_loss, last_l1, in_use) = history[0], history[-1]
    assert last_l1 < 0.7 * first_l1 and last_loss < first_loss
    assert in_use > 4  # the restarts keep codes alive
    save_vqgan(str(tmp_path / "vq"), config, params)
    loaded = VQTokenizer.from_dir(str(tmp_path / "vq"))
    direct = VQTokenizer(config, params)
    np.testing.assert_array_equal(loaded.encode(pictures[:8]), direct.encode(pictures[:8]))
    assert loaded.decode(loaded.encode(pictures[:2])).shape == (2, 16, 16, 3)


def test_the_count_question_pairs_a_held_out_shape_with_any_training_shape(monkeypatch):
    """The second shape was drawn from the first 20 of the 30 candidates (listed red, green, blue,
    yellow): a yellow second shape was never asked about."""
    from unitoken_jax.world import evaluate

    drawn = []
    real_draw = shapes.draw
    monkeypatch.setattr(shapes, "draw", lambda things, rng=None: drawn.append(list(things)) or real_draw(things, rng))

    class Answers:  # what understanding() asks, answered "two" every time
        def understand(self, pictures, questions, max_new_tokens):
            return [shapes.ENGLISH.counts[2]] * len(questions)

    evaluate.understanding(Answers(), per_thing=8)
    seconds = [things[1] for things in drawn if len(things) == 2]
    assert len(seconds) == 32
    held_out = {(t.colour, t.shape, t.place) for t in shapes.held_out_things()}
    assert all((t.colour, t.shape, t.place) not in held_out for t in seconds)
    assert {t.colour for t in seconds} == set(shapes.COLOURS)  # every colour comes up (yellow did not)


def test_an_export_writes_the_bundled_layout_and_replaces_only_an_earlier_export(tmp_path):
    """`python -m unitoken_jax.world.default --to DEST` deleted DEST whole before writing: a build's
    workdir given as DEST (its stages, its VQ-GAN, the user's notes) went, and the export then
    failed for the VQ-GAN it had just deleted. Now a folder holding anything an export does not
    write is refused untouched, and an earlier export (even the one the sources are in) is replaced
    only once the new one is written."""
    import os
    import shutil

    import pytest

    from unitoken_jax.world import default

    source = tmp_path / "source"
    shutil.copytree(default.DEFAULT_DIR, source)
    dest = tmp_path / "dest"
    default.export(str(source / "model"), str(source / "vqgan"), str(dest), {"note": 1})
    assert sorted(os.listdir(dest)) == sorted(default.EXPORTED) and default.settings(str(dest))["results"] == {"note": 1}
    # the model keeps how the world draws (a copy of it named as --model drew 512 x 512 from the reference's
    # prompt): the bundled record, the same tokenizer and VQ-GAN fingerprints as the package's own
    import json

    with open(dest / "model" / "trained_pictures.json") as f, \
            open(os.path.join(default.DEFAULT_DIR, "model", "trained_pictures.json")) as g:
        assert json.load(f) == json.load(g)
    # onto itself: the sources are read before the folder is replaced
    default.export(str(source / "model"), str(source / "vqgan"), str(source))
    assert sorted(os.listdir(source)) == sorted(default.EXPORTED) and default.available(str(source))
    assert default.pipeline(str(source)).understand([[]], [shapes.QUESTIONS["colour"]])[0] != ""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds notes.txt, which an export does not write"):
        default.export(str(source / "model"), str(source / "vqgan"), str(workdir))
    assert (workdir / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["dest", "source",
                                                                                             "workdir"]


def test_the_chance_of_each_question_is_a_uniform_guess_among_the_worlds_answers():
    """The evaluation's chance column: one over the answers the world has for each question, counted
    from the world's own scenes (the count question's was 1/2; the world has three counts)."""
    import itertools

    from unitoken_jax.world.evaluate import CHANCE

    things = shapes.all_things()
    scenes = [[t] for t in things] + [list(p) for n in (2, 3) for p in itertools.combinations(things, n)
                                      if len({t.place for t in p}) == n]
    per_kind = {}
    for scene in scenes:
        for kind, answer in shapes.answers(scene).items():
            if kind == "caption" and len(scene) > 1:
                continue  # (the evaluation's captions are of one held-out shape)
            per_kind.setdefault(kind, set()).add(answer)
    assert {kind: 1 / len(answers) for kind, answers in per_kind.items()} == CHANCE


def test_a_build_stopped_part_way_leaves_no_half_step_and_keeps_the_times_of_the_steps_it_finished(
        tmp_path, monkeypatch):
    """A VQ-GAN stopped while it was saved left its weights without its config: the next run reused
    it ("made before its settings were recorded") and failed. A build stopped in a stage lost the
    times of the steps before it (timings were written at the end), and a stage stopped before its
    first step said "its last step is saved" of nothing."""
    import os

    import pytest

    from unitoken_jax.world import build

    trained = []
    monkeypatch.setattr(build, "train_vqgan", lambda config, pixels, tc: (trained.append(len(pixels)) or {}, []))

    def save(out, config, params, stop=False):
        os.makedirs(out, exist_ok=True)
        (tmp_path / out / "vqgan.safetensors").write_bytes(b"weights")
        if stop:
            raise KeyboardInterrupt
        (tmp_path / out / "vqgan_config.json").write_text("{}")

    monkeypatch.setattr(build, "save_vqgan", lambda *a: save(*a, stop=True))
    with pytest.raises(KeyboardInterrupt):
        build.train_vq(str(tmp_path), 2, pictures=4)
    assert not (tmp_path / "vqgan").exists()
    monkeypatch.setattr(build, "save_vqgan", save)
    assert build.train_vq(str(tmp_path), 2, pictures=4) == str(tmp_path / "vqgan") and trained == [4, 4]
    assert sorted(os.listdir(tmp_path / "vqgan")) == [build.SETTINGS, "history.json", "vqgan.safetensors",
                                                       "vqgan_config.json"]
    assert not (tmp_path / "vqgan.partial").exists()

    # stopped in stage I: the VQ-GAN's and the data's times are kept
    def ran(name, seconds, out):
        def step(*args, ran=None, **kwargs):
            ran[name] = seconds
            return str(tmp_path / out)
        return step

    monkeypatch.setattr(build, "train_vq", ran("vqgan", 5.0, "vqgan"))
    monkeypatch.setattr(build, "make_data", ran("pretokenize", 2.0, "data"))
    monkeypatch.setattr(build, "train_and_evaluate", lambda config, run_dir: None)  # stopped before a step
    with pytest.raises(build.Stopped, match="SIGTERM; before its first step, nothing to save.: run the same command "
                                            "again to start it"):
        build.build(str(tmp_path / "w"), vq_steps=2, pictures=4, stage1_steps=2, stage2_steps=2)
    assert json.loads((tmp_path / "w" / "timings.json").read_text()) == {"vqgan": 5.0, "pretokenize": 2.0}
    os.makedirs(tmp_path / "w" / "stage1" / "checkpoints" / "1")  # stopped after a step was saved
    with pytest.raises(build.Stopped, match="SIGTERM; its last step is saved.: run the same command again to go on"):
        build.build(str(tmp_path / "w"), vq_steps=2, pictures=4, stage1_steps=2, stage2_steps=2)


def test_a_build_reuses_a_step_only_if_it_was_made_with_the_same_flags_and_keeps_its_timings(tmp_path, capsys):
    """`world.build` reused every step it found done whatever the flags (a rerun with --vq-steps
    1500 after a run with 0 kept the untrained VQ-GAN), accepted counts below 1 (failing steps
    later, or training nothing), and a rerun that reused every step wrote ~0 s over its timings."""
    import os

    import pytest

    from unitoken_jax.data import pretokenize as pt
    from unitoken_jax.world import build

    flags = dict(vq_steps=1500, pictures=4000, stage1_steps=100, stage2_steps=1500)
    made = {"vqgan": {"steps": 1500, "pictures": 3000}, "data": {"pictures": 4000}, "stage1": {"steps": 100},
            "stage2": {"steps": 1500}}
    for step, settings in made.items():  # every step done, as an earlier run left them
        os.makedirs(tmp_path / step / ("final" if step.startswith("stage") else ""), exist_ok=True)
        (tmp_path / step / build.SETTINGS).write_text(json.dumps(settings))
    (tmp_path / "vqgan" / "vqgan.safetensors").write_bytes(b"")
    (tmp_path / "data" / pt.SETTINGS_FILE).write_text("{}")
    timings = {"vqgan": 494.0, "pretokenize": 15.0, "stage1": 30.0, "stage2": 607.0}
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    assert build.build(str(tmp_path), **flags) == str(tmp_path / "stage2" / "final")
    assert json.loads((tmp_path / "timings.json").read_text()) == timings
    with pytest.raises(build.SettingsError, match="stage2 was made with steps 1500 .now 300.; delete it"):
        build.build(str(tmp_path), **{**flags, "stage2_steps": 300})
    with pytest.raises(build.SettingsError, match="vqgan was made with steps 1500 .now 20."):
        build.build(str(tmp_path), **{**flags, "vq_steps": 20})
    # a step made again (its folder deleted, as that says) is not followed by the old steps made from
    # the one before: they record its settings too (the data and both stages were reused, a model
    # trained on another VQ-GAN's codes or on other data, unsaid)
    (tmp_path / "vqgan" / build.SETTINGS).write_text(json.dumps({"steps": 20, "pictures": 3000}))  # made again
    (tmp_path / "data" / build.SETTINGS).write_text(json.dumps({"pictures": 4000, "vq_steps": 1500}))
    with pytest.raises(build.SettingsError, match="data was made with vq_steps 1500 .now 20.; delete it"):
        build.build(str(tmp_path), **{**flags, "vq_steps": 20})
    (tmp_path / "data" / build.SETTINGS).write_text(json.dumps({"pictures": 60, "vq_steps": 20}))  # made again
    (tmp_path / "stage1" / build.SETTINGS).write_text(json.dumps({"steps": 100, "vq_steps": 1500, "pictures": 4000}))
    with pytest.raises(build.SettingsError, match="stage1 was made with vq_steps 1500 .now 20., pictures 4000 .now "
                                                  "60.; delete it"):
        build.build(str(tmp_path), **{**flags, "vq_steps": 20, "pictures": 60})
    # a stopped stage resumed with fewer steps than it reached: one line naming the flag (a traceback
    # naming total_steps)
    def trained_past(config, run_dir):
        raise ValueError(f"the run in {run_dir} is at step 130, past total_steps={config.total_steps}: give ...")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(build, "train", trained_past)
        with pytest.raises(build.SettingsError, match="stage II in .*run has trained past --stage2-steps 60: give "
                                                      "a larger --stage2-steps, or delete"):
            build._train_stage("stage II", "--stage2-steps", build.stage_config(2, "data", 60), str(tmp_path / "run"))
    with pytest.raises(SystemExit):
        build.main(["--workdir", str(tmp_path / "new"), "--vq-steps", "0"])
    assert "0 is out of range: it must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "a-file").write_text("")  # (a FileExistsError traceback)
    with pytest.raises(SystemExit):
        build.main(["--workdir", str(tmp_path / "a-file"), "--vq-steps", "2"])
    assert "--workdir " + str(tmp_path / "a-file") + " is a file; give a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (under a file: makedirs' NotADirectoryError traceback)
        build.main(["--workdir", str(tmp_path / "a-file" / "sub"), "--vq-steps", "2"])
    assert f"--workdir {tmp_path / 'a-file' / 'sub'} cannot be made: Not a directory" in capsys.readouterr().err
    # the fine-tuning demo's counts too (each was a ValueError traceback, --steps 0 after building its data)
    from unitoken_jax.world import finetune_demo

    for flag, value, said in (("--steps", "0", "0 is out of range: it must be at least 1"),
                              ("--pictures", "0", "0 is out of range: it must be at least 1"),
                              ("--rank", "0", "0 is out of range: it must be at least 1"),
                              ("--english-pictures", "-1", "-1 is out of range: it must be at least 0"),
                              ("--learning-rate", "nan", "'nan' is not a number above 0")):
        with pytest.raises(SystemExit):
            finetune_demo.main(["--workdir", str(tmp_path / "new"), flag, value])
        assert said in capsys.readouterr().err, flag
    assert not (tmp_path / "new").exists()
    # a stop is one line and an exit status, not a traceback (the training saves often enough to go on from)
    import argparse

    from unitoken_jax.shutdown import Terminated
    from unitoken_jax.world import default

    parser = argparse.ArgumentParser(prog="world.build")
    for stop, code, said in ((build.Stopped("the training in X stopped before its end"), 143,
                              "world.build: the training in X stopped before its end"),
                             (KeyboardInterrupt(), 130, "world.build: stopped (Ctrl-C): run the same command again"),
                             # (a SIGTERM outside the trainings killed the build unsaid)
                             (Terminated(), 143, "world.build: stopped (SIGTERM): run the same command again")):
        def stopped():
            raise stop
        with pytest.raises(SystemExit) as exited:
            build.script(parser, False, stopped)
        assert exited.value.code == code and said in capsys.readouterr().err
    assert build.stage_config(2, "data", 1500).checkpoint_every == 100  # (they had saved only at their end)
    assert finetune_demo.lora_config(("data",), default.DEFAULT_DIR + "/model", 700, 16,
                                     3e-3).checkpoint_every == 100
    with pytest.raises(ValueError, match="VQTrainConfig.restart_every=0"):
        VQTrainConfig(restart_every=0)
    with pytest.raises(ValueError, match="3 pictures cannot fill a batch of 32"):
        train_vqgan(shapes.VQ_CONFIG, np.zeros((3, 64, 64, 3), np.float32), VQTrainConfig(steps=1))
    with pytest.raises(ValueError, match=r"pixels hold no pictures \(shape \(0, 64, 64, 3\)\)"):  # (NumPy's error)
        train_vqgan(shapes.VQ_CONFIG, np.zeros((0, 64, 64, 3), np.float32), VQTrainConfig(steps=1))
    # pictures and settings a VQ-GAN cannot train on, said before it trains (uint8 0..255 and NaN ran to
    # the end, a useless or NaN tokenizer; a NaN or negative rate likewise; the rest were Flax's shape
    # errors, a broadcast TypeError or NumPy's "expected non-negative integer")
    for field, value, said in (("learning_rate", float("nan"), "a finite number, above 0"),
                               ("learning_rate", -1.0, "a finite number, above 0"),
                               ("beta", float("inf"), "a finite number, at least 0"),
                               ("seed", -1, "a whole number, at least 0")):
        with pytest.raises(ValueError, match=f"VQTrainConfig.{field}={value!r}: {said}"):
            VQTrainConfig(**{field: value})
    nan = np.zeros((4, 64, 64, 3), np.float32)
    nan[1, 2, 3, 0] = np.nan
    for pixels, said in ((np.zeros((4, 64, 64, 3), np.uint8), "pixels must be a float NumPy array .* dtype uint8"),
                         (np.zeros((4, 64, 64, 1), np.float32), r"\[N, H, W, 3\] .* shape \(4, 64, 64, 1\)"),
                         (np.zeros((4, 30, 30, 3), np.float32), "H and W multiples of 16"),
                         ([np.zeros((64, 64, 3), np.float32)] * 4, "got list"),
                         (np.full((4, 64, 64, 3), 255.0, np.float32), r"must lie in \[-1, 1\] .* got \[255, 255\]"),
                         (nan, "pixels hold 1 values that are not finite")):
        with pytest.raises(ValueError, match=said):
            train_vqgan(shapes.VQ_CONFIG, pixels, VQTrainConfig(steps=1, batch=2))
    from unitoken_jax.models.vqgan import VQGANConfig as Config

    for field, value in (("n_embed", 0), ("embed_dim", 0), ("z_channels", -1), ("ch_mult", (1, 0))):
        with pytest.raises(ValueError, match=f"VQ-GAN config {field}="):
            Config(**{field: value}).validate()
