"""The Grain pipeline: the understanding : generation ratio holds in every batch, samples are
never split and arrive intact (tokens and pixels), processes read disjoint parts, weights are
respected, too-long samples are dropped and counted, the iterator state restores the order, and a
packed row gives each sample the loss it has alone."""

import dataclasses
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest

from unitoken_jax.data import demo
from unitoken_jax.data import pretokenize as pt
from unitoken_jax.data.pipeline import (InputPipeline, PipelineConfig, Source, dropped_too_long, read_meta,
                                        sources_from)
from unitoken_jax.tokenizer import images as image_io

SETTINGS = pt.PretokenizeSettings(name="demo", vq_size=32, siglip_size=56, max_length=None, chunk_size=64,
                                  vq_batch=16)


def _dataset(root, name, n, seed, varied=False):
    """Demo items; `varied`: answers of 1 to 8 sentences (samples of different lengths)."""
    path = demo.write_demo_items(str(root / f"{name}_items"), n, seed=seed)
    items = json.load(open(path))
    rng = np.random.default_rng(seed)
    for it in items:
        it["id"] = f"{name}-{it['id']}"
        answer = it["conversations"][1]
        if varied and answer["value"] != "<|image|>":
            answer["value"] = " ".join([answer["value"] + "."] * int(rng.integers(1, 9)))
    json.dump(items, open(path, "w"))
    text, vq = demo.demo_tokenizers()
    pt.pretokenize(path, str(root / name), text, vq, SETTINGS, progress=False)
    return str(root / name)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return _dataset(root, "a", 40, 0), _dataset(root, "b", 40, 1)


def _by_id(*paths):
    out = {}
    for p in paths:
        source, _, _ = pt.open_dataset(p)
        for i in range(len(source)):
            r = source[i]
            out[r["id"].decode()] = r
    return out


@pytest.mark.parametrize("mix", [(1, 1), (2, 1)])
def test_every_batch_has_the_ratio_and_whole_intact_samples(datasets, mix):
    records = _by_id(*datasets)
    config = PipelineConfig(rows=3, length=300, mix=mix, max_images=12, num_threads=1)
    it = InputPipeline(list(datasets), config).iterator()
    for _ in range(5):
        b = next(it)
        groups = len(b["kinds"]) // sum(mix)
        assert groups >= 1 and b["kinds"].count("understanding") == groups * mix[0]
        assert b["kinds"].count("generation") == groups * mix[1]
        tile = 0
        order = []  # samples in the order their images were stacked
        for row, ids in enumerate(b["sample_ids"]):
            seg = b["segment_ids"][row]
            assert sorted(set(seg[seg > 0].tolist())) == list(range(1, len(ids) + 1))
            for j, sid in enumerate(ids):
                where = np.flatnonzero(seg == j + 1)
                assert np.all(np.diff(where) == 1), "a sample must be contiguous"
                r = records[sid]
                np.testing.assert_array_equal(b["tokens"][row, where], r["tokens"])
                np.testing.assert_array_equal(b["labels"][row, where], r["labels"])
                np.testing.assert_array_equal(b["positions"][row, where], np.arange(len(where)))
                order.append((row, where, r))
        # images are stacked in packing order; each sample's features point at its own tiles
        for row, where, r in sorted(order, key=lambda o: b["feature_index"][o[0], o[1]][
                b["is_continuous"][o[0], o[1]]].min() if len(o[2]["image_bytes"]) else -1):
            if not len(r["image_bytes"]):
                continue
            expect = image_io.siglip_pixels(image_io.to_rgb(image_io.load_image(bytes(r["image_bytes"][0]))), 56)
            used = b["feature_index"][row, where][b["is_continuous"][row, where]]
            first = used.min() // 16
            np.testing.assert_allclose(b["pixels"][first], expect, atol=1e-6)
            np.testing.assert_array_equal(used - used.min(), r["feature_index"][r["is_continuous"]])
            tile += 1
        assert not b["pixels"][tile:].any()  # the rest is padding


def test_with_blocks_each_rows_pictures_are_in_its_blocks_tiles(datasets):
    """`blocks` (training: one per data-parallel shard): the rows of block k find their pictures
    among block k's tiles, at the tiles their feature indices name."""
    records = _by_id(*datasets)
    config = PipelineConfig(rows=4, length=300, max_images=8, blocks=2, num_threads=1)
    it = InputPipeline(list(datasets), config).iterator()
    for _ in range(4):
        b = next(it)
        used_tiles = set()
        for row, ids in enumerate(b["sample_ids"]):
            block = row // 2
            for j, sid in enumerate(ids):
                r = records[sid]
                where = np.flatnonzero(b["segment_ids"][row] == j + 1)
                used = b["feature_index"][row, where][b["is_continuous"][row, where]]
                if not len(r["image_bytes"]):
                    assert not len(used)
                    continue
                tile = used.min() // 16
                assert 4 * block <= tile < 4 * (block + 1)
                picture = image_io.to_rgb(image_io.load_image(bytes(r["image_bytes"][0])))
                np.testing.assert_allclose(b["pixels"][tile], image_io.siglip_pixels(picture, 56), atol=1e-6)
                used_tiles.add(int(tile))
        assert used_tiles and not b["pixels"][sorted(set(range(8)) - used_tiles)].any()


def test_state_restores_the_same_batches(datasets):
    config = PipelineConfig(rows=2, length=300, max_images=4, num_threads=2, seed=3)
    it = InputPipeline(list(datasets), config).iterator()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives JSON, as in a checkpoint
    expected = [next(it) for _ in range(3)]
    again = InputPipeline(list(datasets), config).iterator()
    again.set_state(state)
    for e in expected:
        got = next(again)
        assert got["sample_ids"] == e["sample_ids"]
        for k in ("tokens", "feature_index", "pixels"):
            np.testing.assert_array_equal(got[k], e[k])
    other_seed = InputPipeline(list(datasets), PipelineConfig(rows=2, length=300, max_images=4, seed=4)).iterator()
    assert next(other_seed)["sample_ids"] != next(InputPipeline(list(datasets), config).iterator())["sample_ids"]


def test_processes_read_disjoint_parts(datasets):
    config = PipelineConfig(rows=2, length=300, max_images=4, num_threads=1)
    seen = []
    for p in range(2):
        it = InputPipeline(list(datasets), config, process_index=p, process_count=2).iterator()
        ids = [i for _ in range(4) for row in next(it)["sample_ids"] for i in row]
        seen.append(set(ids))
        assert len(ids) == len(set(ids))  # well inside one epoch: no repeats
    assert not seen[0] & seen[1]


def test_each_process_mixes_the_datasets_by_weight(datasets):
    """Grain mixes datasets in a fixed pattern (a, b, a, b, ... at 1 : 1) and the stream was cut
    [i::n] between processes after it: process 0 of 2 read only dataset a, process 1 only b (and
    worker processes, cut the same way, gave batches of one dataset each in turn)."""
    config = PipelineConfig(rows=4, length=300, mix=(1, 1), max_images=16, num_threads=1)
    for p in range(2):
        it = InputPipeline(list(datasets), config, process_index=p, process_count=2).iterator()
        ids = [i for _ in range(12) for row in next(it)["sample_ids"] for i in row]
        share_b = sum(i.startswith("b-") for i in ids) / len(ids)
        assert len(ids) > 60 and 0.3 < share_b < 0.7, (p, share_b)


def test_no_batch_holds_a_record_twice(tmp_path):
    """The look-ahead window reaches into the next epoch, reshuffled, on a small dataset: one record
    went twice into a batch (5 batches of 80 here). A group holding one the batch has waits."""
    varied = _dataset(tmp_path, "v", 60, 2, varied=True)
    for seed in (5, 6):
        it = InputPipeline([varied], PipelineConfig(rows=4, length=400, max_images=8, num_threads=1, seed=seed,
                                                    lookahead=64)).iterator()
        for _ in range(80):
            ids = [i for row in next(it)["sample_ids"] for i in row]
            assert len(ids) == len(set(ids)), sorted(ids)


def test_a_dataset_whose_every_item_was_skipped_is_named_as_empty(datasets, tmp_path, caplog):
    """Every item skipped (a wrong image root): pre-tokenization finished with no record, and a
    training run over it, alone or beside another dataset, failed in array_record with "Paths
    sequence can not be of 0 length", naming nothing."""
    import logging

    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"id": "e-1", "image": ["nope.png"], "conversations": [
        {"from": "human", "value": "<|image|>What is it?"}, {"from": "gpt", "value": "a shape"}]}]))
    text, vq = demo.demo_tokenizers()
    with caplog.at_level(logging.WARNING):
        done = pt.pretokenize(str(items), str(tmp_path / "empty"), text, vq, SETTINGS, progress=False)
    assert done["written"] == 0 and "no item was written, all 1 were skipped" in caplog.text
    for sources in ([str(tmp_path / "empty")], [str(tmp_path / "empty"), datasets[0]]):
        with pytest.raises(ValueError, match="empty holds no records: pre-tokenization skipped every item"):
            InputPipeline(sources, PipelineConfig(rows=2, length=300, max_images=4, num_threads=1))
    # (and a dataset weighted 0 is not one that has no samples, nor is a weight of NaN a count's error)
    with pytest.raises(ValueError, match="samples but every dataset that has them has ratio 0"):
        InputPipeline([Source(datasets[0], 0.0)], PipelineConfig(rows=2, length=300, max_images=4, num_threads=1))
    with pytest.raises(ValueError, match="ratio nan; a weight is a finite number, 0 or more"):
        sources_from([{"path": datasets[0], "ratio": float("nan")}])
    # data of one kind (edit pairs alone: generation) under a mix of both: the way out is said
    path = demo.write_demo_items(str(tmp_path / "drawn_items"), 12, seed=3)
    drawn = [it for it in json.load(open(path)) if it["conversations"][1]["value"] == "<|image|>"]
    json.dump(drawn, open(path, "w"))
    pt.pretokenize(path, str(tmp_path / "drawn"), text, vq, SETTINGS, progress=False)
    with pytest.raises(ValueError, match=re.escape(
            f"asks for understanding samples but no dataset has any (counts: {{'understanding': 0, 'generation': "
            f"{len(drawn)}}}); to train on generation samples alone, set data.mix to (0, 1) "
            "(--config.data.mix=\"(0,1)\")")):
        InputPipeline([str(tmp_path / "drawn")], PipelineConfig(rows=2, length=300, max_images=4, num_threads=1))


def test_datasets_made_with_other_tokenizers_are_refused_by_name_and_other_crops_said(datasets, tmp_path, caplog):
    """Datasets pre-tokenized with different text tokenizers trained as one (the same id two words),
    unsaid; so did datasets cut at different VQ crops, and the trained model records only one."""
    from unitoken_jax.tokenizer.text import TextTokenizer

    text, vq = demo.demo_tokenizers()
    spec = json.loads(text._full.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]  # another tokenizer: one merge fewer
    items = demo.write_demo_items(str(tmp_path / "items"), 6, seed=5)
    pt.pretokenize(items, str(tmp_path / "other"), TextTokenizer(json.dumps(spec)), vq, SETTINGS, progress=False)
    config = PipelineConfig(rows=2, length=300, max_images=4, num_threads=1)
    other = tmp_path / "other"
    # the dataset's record says it; without its pre-tokenization's leftovers (.partial) too; and for
    # one finished before the record was written (2026-12-07), the job file in them says it
    for finished in ("now", "now, .partial deleted", "before made_with.json"):
        if finished == "now, .partial deleted":
            os.rename(other / ".partial", tmp_path / "partial")
        elif finished == "before made_with.json":
            os.rename(tmp_path / "partial", other / ".partial")
            os.remove(other / pt.MADE_WITH_FILE)
        with pytest.raises(ValueError, match="pre-tokenized with different text tokenizers") as e:
            InputPipeline([datasets[0], datasets[1], str(other)], config)
        assert f"{datasets[0]}, {datasets[1]}" in str(e.value) and str(other) in str(e.value), finished
    shutil.rmtree(other / ".partial")  # a dataset that recorded nothing is not held to it
    assert InputPipeline([datasets[0], str(other)], config).made_with == pt.made_with(datasets[0])
    assert pt.made_with(datasets[0]) == {"tokenizer_sha256": text.fingerprint(), "vqgan_sha256": vq.fingerprint()}
    # pictures cut at another crop: said, naming each dataset's
    pt.pretokenize(items, str(tmp_path / "small"), text, vq, dataclasses.replace(SETTINGS, vq_size=16),
                   progress=False)
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.data.pipeline"):
        InputPipeline([datasets[0], str(tmp_path / "small")], config)
    assert f"at 16 and 32 px ({datasets[0]}: 32, {tmp_path / 'small'}: 16)" in caplog.text, caplog.text


def test_dataset_weights_follow_ratio_and_yaml_meta(datasets, tmp_path, caplog):
    meta = tmp_path / "meta.yaml"
    meta.write_text(f"META:\n  - path: '{datasets[0]}'\n    ratio: 1.0\n  - path: '{datasets[1]}'\n    ratio: 3.0\n")
    sources = read_meta(str(meta))
    assert sources == [Source(datasets[0], 1.0), Source(datasets[1], 3.0)]
    # `--config.data.sources=meta.yaml` reaches the loop as a one-element tuple: still the meta file
    assert sources_from((str(meta),)) == sources and sources_from([str(meta), datasets[0]])[:2] == sources
    with caplog.at_level(logging.INFO, logger="unitoken_jax.data.pipeline"):
        it = InputPipeline(str(meta), PipelineConfig(rows=4, length=300, mix=(1, 0), max_images=16,
                                                     num_threads=1)).iterator()
    ids = [i for _ in range(25) for row in next(it)["sample_ids"] for i in row]
    share_b = sum(i.startswith("b-") for i in ids) / len(ids)
    assert len(ids) > 150 and 0.65 < share_b < 0.85  # 3 : 1 -> 0.75
    said = re.search(r"data: understanding \(every sample\): \S+ ([\d.]+)%, \S+ ([\d.]+)%$", caplog.text,
                     re.M)  # the shares the log expects: ratio x samples of the kind (the same count here)
    assert said and abs(float(said[2]) - 75) < 8, caplog.text


def test_too_long_samples_are_dropped_and_counted(datasets, tmp_path, caplog):
    records = _by_id(datasets[0])
    lengths = sorted(len(r["tokens"]) for r in records.values() if int(r["kind"]) == 0)
    limit = lengths[len(lengths) // 2]
    it = InputPipeline([datasets[0]], PipelineConfig(rows=2, length=limit, mix=(1, 0), max_images=8,
                                                     num_threads=1)).iterator()
    kept = [i for _ in range(6) for row in next(it)["sample_ids"] for i in row]
    state = it.get_state()
    assert all(len(records[i]["tokens"]) <= limit for i in kept)
    assert state["dropped_too_long"] > 0 and state["packed"] == len(kept)
    with pytest.raises(ValueError, match="raise data.length"):
        next(InputPipeline([datasets[0]], PipelineConfig(rows=2, length=20, mix=(1, 0), max_images=8)).iterator())
    # a dataset pre-tokenized for samples longer than the rows says so when the pipeline opens it
    longer = tmp_path / "longer"
    shutil.copytree(datasets[0], longer)
    settings = json.loads((longer / pt.SETTINGS_FILE).read_text())
    (longer / pt.SETTINGS_FILE).write_text(json.dumps({**settings, "max_length": 4096}))
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.data.pipeline"):
        InputPipeline([str(longer)], PipelineConfig(rows=2, length=limit, mix=(1, 0), max_images=8))
    # (what the data holds, from its recorded sizes: it had said "up to 4096", the pre-tokenizer's limit)
    every = [len(r["tokens"]) for r in records.values()]
    over = sum(n > limit for n in every)
    assert (f"{over} of the {len(every)} samples of {longer} are longer than a row (up to {max(every)} positions, "
            f"rows are {limit}: data.length)") in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.data.pipeline"):  # none longer than a row: nothing
        InputPipeline([str(longer)], PipelineConfig(rows=2, length=max(every), mix=(1, 0), max_images=8))
    assert "longer than a row" not in caplog.text
    os.remove(longer / pt.SIZES_FILE)  # a dataset written before its sizes were recorded: the limit, as before
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.data.pipeline"):
        InputPipeline([str(longer)], PipelineConfig(rows=2, length=limit, mix=(1, 0), max_images=8))
    assert f"holds samples of up to 4096 positions, rows are {limit} (data.length)" in caplog.text
    # pre-tokenized with no maximum (--max-length 0): said too (it was not, whatever the data held)
    (longer / pt.SETTINGS_FILE).write_text(json.dumps({**settings, "max_length": None}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.data.pipeline"):
        InputPipeline([str(longer)], PipelineConfig(rows=2, length=limit, mix=(1, 0), max_images=8))
    assert f"holds samples of up to any number of positions, rows are {limit} (data.length)" in caplog.text
    with pytest.raises(ValueError, match="does not fit an empty batch"):
        next(InputPipeline([datasets[0]], PipelineConfig(rows=1, length=300, mix=(2, 2), max_images=1)).iterator())


def test_samples_dropped_in_worker_processes_are_counted_and_the_fill_bound_leaves_them_out(datasets):
    """With worker processes the count of dropped samples was never reported (the training log had
    no dropped_too_long, and no warning); the packing bound counted samples that are dropped, so
    it promised rows fuller than whole samples can make them."""
    from unitoken_jax.data.packing import whole_sample_bound

    records = _by_id(datasets[0])
    understanding = [r for r in records.values() if int(r["kind"]) == 0]
    limit = sorted(len(r["tokens"]) for r in understanding)[len(understanding) // 2]
    config = PipelineConfig(rows=2, length=limit, mix=(1, 0), max_images=8, num_threads=1)
    alone = InputPipeline([datasets[0]], config).iterator()
    workers = InputPipeline([datasets[0]], dataclasses.replace(config, worker_count=1)).iterator()
    try:
        for _ in range(4):
            assert next(workers)["sample_ids"] == next(alone)["sample_ids"]
        assert dropped_too_long(workers) == dropped_too_long(alone) == alone.get_state()["dropped_too_long"] > 0
    finally:
        workers.close()
    fit = [r for r in understanding if len(r["tokens"]) <= limit]
    per_tile = (SETTINGS.siglip_size // SETTINGS.patch) ** 2
    expect = whole_sample_bound(([len(r["tokens"]) for r in fit], []),
                                ([int(np.sum(r["num_features"])) / per_tile for r in fit], []), (1, 0), 2, limit, 8)
    assert InputPipeline([datasets[0]], config).fill_bound() == (expect, len(fit))


def test_any_whole_seed_draws_and_a_dataset_never_drawn_does_not_widen_the_window(datasets):
    """The shuffle seed was seed * 1000 + ..., which Grain refused past 2**32 for seeds from
    4,294,968 (a date such as 20261205) with a number the user never gave. A source of ratio 0
    (kept for its kinds, never drawn) counted in the epoch that bounds the packing window."""
    config = PipelineConfig(rows=2, length=300, max_images=4, num_threads=1, seed=20261205)
    assert next(InputPipeline(list(datasets), config).iterator())["sample_ids"]
    with pytest.raises(ValueError, match="seed=-1 must be a whole number of at least 0"):
        InputPipeline(list(datasets), dataclasses.replace(config, seed=-1))
    config = dataclasses.replace(config, lookahead=1000)
    alone = InputPipeline([datasets[0]], config).window
    assert InputPipeline([Source(datasets[0]), Source(datasets[1], ratio=0.0)], config).window == alone
    assert InputPipeline(list(datasets), config).window > alone


@pytest.mark.parametrize("entry,says", [
    ({"ratio": 2}, "META entry 0 must be a mapping with a 'path'"),  # a KeyError with a traceback
    ("data/a", "META entry 0 must be a mapping with a 'path'"),  # a TypeError
    ({"path": "a", "ratio": None}, "ratio=None must be a number"),
    ({"path": "a", "ratio": "half"}, "META entry 0 (a): ratio='half' must be a number"),  # the file was not named
    ({"path": "a", "ratio": -1}, "ratio=-1 must be a number of at least 0"),  # the dataset was dropped silently
    ({"path": "a", "ration": 0.1}, "META entry 0 (a): unknown key(s) 'ration'; an entry takes path, ratio, type"),
])
def test_a_data_meta_file_with_a_bad_entry_names_it(tmp_path, entry, says):
    import yaml

    meta = tmp_path / "meta.yaml"
    meta.write_text(yaml.safe_dump({"META": [entry]}))
    with pytest.raises(ValueError, match=re.escape(says)):
        read_meta(str(meta))


def test_a_data_meta_files_exponent_ratios_type_and_encoding(tmp_path):
    """YAML reads `1e-3` (no '.') as a string: it was refused as "not a number"; the reference's
    `type` key is taken; a file not in UTF-8 was a bare UnicodeDecodeError naming no file."""
    meta = tmp_path / "meta.yaml"
    meta.write_text("META:\n  - path: a\n    ratio: 1e-3\n    type: caption\n  - path: b\n")
    assert read_meta(str(meta)) == [Source("a", 0.001), Source("b", 1.0)]
    meta.write_bytes("META:\n  - path: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"meta\.yaml is not UTF-8 text"):
        read_meta(str(meta))


def test_a_packed_row_gives_each_sample_its_own_loss(datasets):
    from unitoken_jax.model import UniTokenModel
    from unitoken_jax.models.config import UniTokenConfig
    from unitoken_jax.configs import stages

    config = UniTokenConfig.from_dict(stages.stage_config(2, "tiny").model.to_dict())
    model = UniTokenModel.random(config, seed=1)
    b = next(InputPipeline([datasets[0]], PipelineConfig(rows=2, length=300, max_images=8, num_threads=1)).iterator())
    logits, _ = model.forward(b["tokens"], labels=b["labels"], positions=b["positions"],
                              segment_ids=b["segment_ids"], is_continuous=b["is_continuous"],
                              feature_index=b["feature_index"], pixels=b["pixels"])
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))

    def sample_loss(lp, labels):
        t = labels[1:]
        ok = t >= 0
        return -lp[:-1][ok, t[ok]].sum()

    checked = 0
    for row, ids in enumerate(b["sample_ids"]):
        for j in range(len(ids)):
            where = np.flatnonzero(b["segment_ids"][row] == j + 1)
            cont = b["is_continuous"][row, where]
            used = b["feature_index"][row, where][cont]
            tiles = np.unique(used // 16)
            alone_index = np.where(cont, b["feature_index"][row, where] - tiles.min() * 16, 0) if len(tiles) else \
                np.zeros(len(where), np.int32)
            alone, _ = model.forward(b["tokens"][row, where][None], labels=b["labels"][row, where][None],
                                     is_continuous=cont[None] if len(tiles) else None,
                                     feature_index=alone_index[None] if len(tiles) else None,
                                     pixels=b["pixels"][tiles] if len(tiles) else None)
            lp_alone = np.asarray(jax.nn.log_softmax(alone, axis=-1))[0]
            packed = sample_loss(logp[row, where], b["labels"][row, where])
            np.testing.assert_allclose(packed, sample_loss(lp_alone, b["labels"][row, where]), rtol=1e-5)
            checked += 1
    assert checked >= 3


def test_a_packed_row_trains_each_sample_as_it_trains_alone(datasets):
    """The test above compares forward losses; this one the gradients, through the train step
    itself (the fused loss, the feature gather, the segment mask): the packed batch with one
    sample's labels kept updates the parameters as that sample alone in a row of its own does,
    and what the padding holds changes nothing. An update of plain SGD at rate 1 is the gradient."""
    import optax

    from unitoken_jax.configs import stages
    from unitoken_jax.model import UniTokenModel
    from unitoken_jax.models.config import UniTokenConfig
    from unitoken_jax.train.step import init_state, make_train_step

    config = UniTokenConfig.from_dict(stages.stage_config(2, "tiny").model.to_dict())
    config = config.replace(decoder=dataclasses.replace(config.decoder, dropout=0.0), z_loss_weight=1e-2)
    params = UniTokenModel.random(config, seed=1).params
    tx = optax.sgd(1.0)
    step = jax.jit(make_train_step(config, tx, jax.tree.map(lambda _: True, params)))
    keys = ("tokens", "labels", "positions", "segment_ids", "is_continuous", "feature_index", "pixels")
    b = next(InputPipeline([datasets[0]], PipelineConfig(rows=2, length=300, max_images=8, num_threads=1)).iterator())

    def update(batch):
        start = init_state(params, tx)
        state, metrics = step(start, {k: np.asarray(batch[k]) for k in keys})
        return float(metrics["loss"]), jax.tree.map(lambda a, c: np.asarray(a) - np.asarray(c), start.params,
                                                    state.params)

    def apart(a, c):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))

    checked = 0
    for row, ids in enumerate(b["sample_ids"]):
        for j in range(len(ids)):
            where = np.flatnonzero(b["segment_ids"][row] == j + 1)
            labels = np.full_like(b["labels"], -100)
            labels[row, where] = b["labels"][row, where]
            if (labels >= 0).sum() == 0:
                continue
            mine = dict(b, labels=labels)
            cont = b["is_continuous"][row, where]
            tiles = np.unique(b["feature_index"][row, where][cont] // 16) if cont.any() else np.zeros(0, int)
            alone = {k: np.zeros((2, 300), b[k].dtype) for k in keys[:-1]}
            alone["labels"][:] = -100
            for k in keys[:-1]:  # its tokens at the start of a row of its own, its tiles first
                alone[k][0, :len(where)] = b[k][row, where]
            alone["feature_index"][0, :len(where)] -= tiles.min() * 16 if len(tiles) else 0
            alone["feature_index"][0, :len(where)] *= cont
            alone["pixels"] = np.zeros_like(b["pixels"])
            alone["pixels"][:len(tiles)] = b["pixels"][tiles]
            (packed_loss, packed), (alone_loss, by_itself) = update(mine), update(alone)
            scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(by_itself))
            assert abs(packed_loss - alone_loss) < 1e-5 * max(1.0, alone_loss), (row, j)
            assert apart(packed, by_itself) < 1e-4 * scale, (row, j, apart(packed, by_itself), scale)
            checked += 1
    assert checked >= 3
    # what the padding holds (tokens, positions, pictures' flags and indices) changes nothing
    loss, grads = update(b)
    pad = b["segment_ids"] == 0
    assert pad.any()
    scrambled = dict(b, tokens=np.where(pad, 5, b["tokens"]), positions=np.where(pad, 7, b["positions"]),
                     is_continuous=np.where(pad, True, b["is_continuous"]),
                     feature_index=np.where(pad, 3, b["feature_index"]))
    loss2, grads2 = update(scrambled)
    assert loss2 == loss and apart(grads, grads2) == 0


def test_anyres_datasets_bring_their_tiles_and_newlines(tmp_path):
    from unitoken_jax.tokenizer import anyres as anyres_lib

    path = demo.write_demo_items(str(tmp_path / "items"), 8, seed=2)
    items = json.load(open(path))
    for i, it in enumerate(items):  # wide and tall pictures, so the grids differ
        name = os.path.join(tmp_path / "items", it["image"][0])
        image_io.load_image(name).resize((64 + 48 * (i % 2), 64 + 48 * (1 - i % 2))).save(name)
    text, vq = demo.demo_tokenizers()
    settings = pt.PretokenizeSettings(name="ar", vq_size=32, siglip_size=56, anyres=True, max_length=None)
    pt.pretokenize(path, str(tmp_path / "ar"), text, vq, settings, progress=False)
    records = _by_id(str(tmp_path / "ar"))
    b = next(InputPipeline([str(tmp_path / "ar")], PipelineConfig(rows=2, length=400, max_images=16,
                                                                   num_threads=1)).iterator())
    for row, ids in enumerate(b["sample_ids"]):
        for j, sid in enumerate(ids):
            r = records[sid]
            where = np.flatnonzero(b["segment_ids"][row] == j + 1)
            cont = b["is_continuous"][row, where]
            if not len(r["image_bytes"]):
                continue
            picture = image_io.to_rgb(image_io.load_image(bytes(r["image_bytes"][0])))
            expect = anyres_lib.anyres_image(picture, 56, 14, settings.pinpoints())
            assert len(expect.pixels) > 1 and r["num_features"].tolist() == [len(expect.pixels) * 16]
            tokens = b["tokens"][row, where].tolist()
            block = tokens[tokens.index(8198) + 1:tokens.index(8196)]  # between SEP and <eoss>
            newlines = block.count(8803)
            assert newlines == np.sum(expect.entries == anyres_lib.NEWLINE_ENTRY) > 0
            first = b["feature_index"][row, where][cont].min() // 16
            np.testing.assert_allclose(b["pixels"][first:first + len(expect.pixels)], expect.pixels, atol=1e-6)
    # split over 2 shards, 1 tile each: a picture of several tiles fits no shard, and the error says why
    config = PipelineConfig(rows=2, length=400, max_images=2, blocks=2, num_threads=1)
    with pytest.raises(ValueError, match=r"2 image tiles, 1 for each block of 1 rows \(the rows and tiles are split"):
        next(InputPipeline([str(tmp_path / "ar")], config).iterator())


def test_worker_processes_give_a_restorable_order(datasets):
    config = PipelineConfig(rows=2, length=300, max_images=4, num_threads=1, worker_count=2)
    it = InputPipeline(list(datasets), config).iterator()
    first = [next(it)["sample_ids"] for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    fourth = next(it)
    it.close()
    again = InputPipeline(list(datasets), config).iterator()
    again.set_state(state)
    got = next(again)
    again.close()
    assert got["sample_ids"] == fourth["sample_ids"]
    np.testing.assert_array_equal(got["pixels"], fourth["pixels"])
    assert len({i for b in first for row in b for i in row}) == sum(len(row) for b in first for row in b)


def test_a_resume_with_another_worker_count_is_refused_by_name(datasets):
    """The sample order depends on the number of worker processes, and Grain's state for one count
    does not restore another (it failed with a KeyError or an IndexError inside its interleave):
    the training loop's checkpointed data state records the count, and a resume with another one
    stops in one line saying which to use; checkpoints from before the count was recorded tell it
    by the shape of their state."""
    from unitoken_jax.train.loop import _gather_data_state, _my_data_state

    def state_after_a_batch(workers):
        it = InputPipeline(list(datasets), PipelineConfig(rows=2, length=300, max_images=4, num_threads=1,
                                                          worker_count=workers)).iterator()
        next(it)
        state = json.loads(json.dumps(it.get_state()))
        getattr(it, "close", lambda: None)()
        return state

    with_workers, without = state_after_a_batch(2), state_after_a_batch(0)
    saved = json.loads(json.dumps(_gather_data_state(with_workers, 2, {})))
    assert _my_data_state(saved, 2) == with_workers
    for count in (0, 3):
        with pytest.raises(ValueError, match=f"data.worker_count=2 and this run has {count}.*worker_count=2"):
            _my_data_state(saved, count)
    with pytest.raises(ValueError, match="data.worker_count=0 and this run has 2"):
        _my_data_state(_gather_data_state(without, 0, {}), 2)
    # written before the count was recorded
    assert _my_data_state({"processes": [without]}, 0) == without
    assert _my_data_state({"processes": [with_workers]}, 2) == with_workers
    with pytest.raises(ValueError, match="data.worker_count=2 and this run has 0"):
        _my_data_state({"processes": [with_workers]}, 0)
    # the count is in Grain's state (one interleaved iterator per worker): another count is refused
    # by name too, rather than reaching Grain's KeyError
    with pytest.raises(ValueError, match="data.worker_count=2 and this run has 3.*worker_count=2"):
        _my_data_state({"processes": [with_workers]}, 3)
    # a state that tells neither: refused without workers (it is not the packing iterator's own)
    with pytest.raises(ValueError, match="with worker processes"):
        _my_data_state({"processes": [{"future_states": {}}]}, 0)
    with pytest.raises(ValueError, match="data.worker_count=0 and this run has 2"):
        _my_data_state({"processes": [without]}, 2)


def test_lookahead_fills_rows_and_resumes_exactly_from_any_batch(tmp_path):
    """Groups packed from beyond a held-back one are recorded in the state, so a restore from any
    batch boundary packs the same batches; no sample is lost or repeated; rows are fuller."""
    datasets = [_dataset(tmp_path, "v", 80, 2, varied=True)]
    config = PipelineConfig(rows=2, length=400, max_images=8, num_threads=1, seed=5, lookahead=8)
    it = InputPipeline(datasets, config).iterator()
    states, batches = [], []
    for _ in range(9):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    states.append(it.get_state())
    assert any(s["packed_ahead"] for s in states), "the test must restore past groups packed ahead"
    for k in (1, 3, 5, 6):
        again = InputPipeline(datasets, config).iterator()
        again.set_state(states[k])
        for e in batches[k:k + 3]:
            got = next(again)
            assert got["sample_ids"] == e["sample_ids"]
            np.testing.assert_array_equal(got["tokens"], e["tokens"])
            np.testing.assert_array_equal(got["pixels"], e["pixels"])
        assert again.get_state()["packed"] == states[k + 3]["packed"]
    # restored, then saved and restored again (a run preempted twice): a group the first restore skipped
    # as packed ahead was left out of the next state, so the second restore packed it again (17 of 215
    # samples of a tiny run trained twice, others never, unsaid)
    chain = InputPipeline(datasets, config).iterator()
    chain.set_state(states[1])
    for k in range(1, 8):
        if k in (3, 5, 6):  # a new process restores the state the last one saved
            saved = json.loads(json.dumps(chain.get_state()))
            assert saved == states[k], k
            chain = InputPipeline(datasets, config).iterator()
            chain.set_state(saved)
        assert next(chain)["sample_ids"] == batches[k]["sample_ids"], k
    ids = [i for b in batches for row in b["sample_ids"] for i in row]
    assert len(ids) == len(set(ids)) and len(ids) < 80  # within the first epoch: each sample once
    in_order = InputPipeline(datasets, dataclasses.replace(config, lookahead=0)).iterator()
    fill = lambda bs: np.mean([(b["segment_ids"] > 0).mean() for b in bs])  # noqa: E731
    strict = fill([next(in_order) for _ in range(9)])
    assert fill(batches) > strict + 0.05
    # the default window (here half an epoch: 20 groups) choosing the group that strands least room:
    # 60 % -> 70 %; taking in order every later group that fits gave 66 % at any look-ahead
    default = InputPipeline(datasets, dataclasses.replace(config, lookahead=PipelineConfig.lookahead))
    assert default.window == 20
    it = default.iterator()
    assert fill([next(it) for _ in range(9)]) > strict + 0.08


def test_every_batch_starts_with_the_oldest_group_not_yet_packed(tmp_path):
    """The choice among later groups never leaves the oldest waiting one behind for good: each
    batch holds the first understanding sample of the stream (in the order the packer reads it)
    that no earlier batch took, so no group waits more batches than the window holds."""
    datasets = [_dataset(tmp_path, "v", 80, 2, varied=True)]
    config = PipelineConfig(rows=2, length=400, max_images=8, num_threads=1, seed=5)
    pipeline = InputPipeline(datasets, config)
    understanding = (s for s in pipeline._streams[0] if len(s.encoded) <= config.length)
    order = [s.id for _, s in zip(range(40), understanding)]  # one epoch: 40 understanding samples
    it = pipeline.iterator()
    packed, overtaken = set(), 0
    for _ in range(9):
        ids = {i for row in next(it)["sample_ids"] for i in row}
        oldest = next(i for i in order if i not in packed)
        assert oldest in ids
        packed |= ids
        overtaken += any(order.index(i) > order.index(oldest) + 1 for i in ids if i in order)
    assert overtaken, "the test must see batches that took later groups"


def test_near_equal_samples_fill_exactly_the_whole_sample_bound_and_varied_ones_stay_under_it(tmp_path):
    """`InputPipeline.fill_bound` (what the training log states at its start): as many samples a
    row as the shortest fit, times the mean length. Near-equal samples (139-147 tokens) fill exactly
    that, two to a 400-token row and three to a 500-token one, whatever the packer chooses; varied
    ones stay under it."""

    def pipeline(path, length):
        return InputPipeline([path], PipelineConfig(rows=2, length=length, max_images=64, num_threads=1, seed=5,
                                                    lookahead=8))

    def fill(p):
        it = p.iterator()
        return float(np.mean([(next(it)["segment_ids"] > 0).mean() for _ in range(40)]))  # two epochs

    equal = _dataset(tmp_path, "equal", 40, 3)
    for length, per_row in ((400, 2), (500, 3)):
        p = pipeline(equal, length)
        bound, read = p.fill_bound()
        assert bound.per_row == per_row and bound.bound < 0.9 and read == 40 and 139 <= bound.shortest <= 147
        assert abs(fill(p) - bound.bound) < 0.005
    p = pipeline(_dataset(tmp_path, "varied", 40, 3, varied=True), 400)
    bound, _ = p.fill_bound()
    assert bound.per_row == 2 and fill(p) < bound.bound


def test_the_fill_bound_takes_every_records_size_from_the_dataset_and_reads_no_record(datasets, monkeypatch):
    """Datasets pre-tokenized since 2026-12-05 hold every record's size (sizes.npy): the bound
    counts them all and reads no record; it equals the bound read from every record."""
    config = PipelineConfig(rows=2, length=400, max_images=8, num_threads=1)
    pipeline = InputPipeline(list(datasets), config)
    opened = pt.open_dataset

    class Unreadable:
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            raise AssertionError("fill_bound read a record")

    monkeypatch.setattr(pt, "open_dataset", lambda path, split=None: (Unreadable(opened(path)[0]), *opened(path)[1:]))
    from_sizes, counted = pipeline.fill_bound(records=10)
    assert counted == 80  # every record of both datasets, whatever `records` asks to read
    monkeypatch.setattr(pt, "open_dataset", opened)
    monkeypatch.setattr(pt, "record_sizes", lambda path: None)
    from_records, read = pipeline.fill_bound()
    assert read == 80 and from_sizes == from_records


def test_the_fill_bound_reads_a_share_of_its_records_from_each_dataset(datasets, monkeypatch):
    """Datasets pre-tokenized before their sizes were recorded: the bound reads a share of each."""
    monkeypatch.setattr(pt, "record_sizes", lambda path: None)
    config = PipelineConfig(rows=2, length=400, max_images=8, num_threads=1)
    whole, read_all = InputPipeline(list(datasets), config).fill_bound()
    assert read_all == 80  # 20 of each kind in each of the two datasets: all of them
    part, read = InputPipeline(list(datasets), config).fill_bound(records=10)
    assert read == 20  # 10 of each kind, 5 from each dataset
    assert part.per_row == whole.per_row and abs(part.mean - whole.mean) < 0.05 * whole.mean


def test_datasets_of_different_picture_layouts_are_said_with_the_one_the_model_records(datasets, tmp_path, caplog):
    """An AnyRes dataset mixed with a one-tile one trained unsaid, and the trained model recorded
    whichever came first in data.sources as inference's layout; a different VQ crop is said too."""
    other = tmp_path / "anyres"
    shutil.copytree(datasets[1], other)
    settings = json.loads((other / pt.SETTINGS_FILE).read_text())
    (other / pt.SETTINGS_FILE).write_text(json.dumps({**settings, "anyres": True, "vq_size": 2 * settings["vq_size"]}))
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.data.pipeline"):
        InputPipeline([datasets[0], str(other)], PipelineConfig(rows=2, length=300, mix=(1, 1), max_images=8))
    assert (f"the datasets lay out their pictures differently ({datasets[0]}: one tile a picture; {other}: AnyRes "
            "tiles): the model learns both, and the trained model records the first's, one tile a picture") \
        in caplog.text, caplog.text
    assert "the datasets cut their pictures for the VQ-GAN at" in caplog.text and "codes only" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unitoken_jax.data.pipeline"):
        InputPipeline(list(datasets), PipelineConfig(rows=2, length=300, mix=(1, 1), max_images=8))
    assert "differently" not in caplog.text and "cut their pictures" not in caplog.text


def test_ratios_that_weigh_nothing_and_datasets_the_mix_leaves_out_are_said(caplog):
    """The README's example set a lone text-to-image dataset's ratio to 0.5: ratios weigh a kind's
    datasets against each other, so it did nothing (the batches were those of ratio 1), unsaid; a
    dataset of a kind the stage's mix leaves out (stage I's 1 : 0) was never trained on, unsaid."""
    from unitoken_jax.data.pipeline import _say_mix, _say_ratios_that_do_nothing

    understanding, generation, both = np.zeros(4, np.int8), np.ones(4, np.int8), np.array([0, 1, 0, 1], np.int8)
    with caplog.at_level(logging.WARNING, logger="unitoken_jax"):
        _say_ratios_that_do_nothing([Source("/caps", 1.0), Source("/t2i", 0.5)], [understanding, generation], (1, 1))
        assert "/t2i is the only dataset of generation samples: its ratio 0.5 weighs it against no other" \
            in caplog.text and "/caps" not in caplog.text, caplog.text
        caplog.clear()
        _say_ratios_that_do_nothing([Source("/caps"), Source("/t2i")], [understanding, generation], (1, 0))
        assert "data.mix [1, 0] takes no generation samples: /t2i, which holds only those, is not trained on" \
            in caplog.text, caplog.text
        caplog.clear()
        _say_ratios_that_do_nothing([Source("/a", 0.5), Source("/b", 2.0), Source("/c", 0.0)], [both, both, generation],
                                    (1, 1))
        assert not caplog.text  # two datasets a kind, each weighed against the other; ratio 0 is none
    # where each kind is drawn from, in the log: a dataset's samples of the kind x its ratio, over the kind's
    with caplog.at_level(logging.INFO, logger="unitoken_jax"):
        _say_mix([Source("/a", 0.5), Source("/b", 2.0), Source("/c", 0.0)], [both, np.array([1, 1, 1, 0], np.int8),
                                                                             generation], (3, 1))
    assert "data: understanding (3 of every 4 samples): /a 33.3%, /b 66.7%; generation (1 of every 4 samples): " \
        "/a 14.3%, /b 85.7%" in caplog.text, caplog.text  # (2 x 0.5 : 1 x 2 = 1 : 2, and 2 x 0.5 : 3 x 2 = 1 : 6)
