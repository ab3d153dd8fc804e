"""Pre-tokenization: records equal the single-item encoder's output, bad items are skipped and
listed, a killed run resumes to the same dataset, and two processes write the dataset one would."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from unitoken_jax.data import demo
from unitoken_jax.data import pretokenize as pt
from unitoken_jax.tokenizer.conversation import encode_item

SETTINGS = pt.PretokenizeSettings(name="t", vq_size=32, siglip_size=56, max_length=400, chunk_size=4, vq_batch=4)


@pytest.fixture(scope="module")
def tokenizers():
    return demo.demo_tokenizers()


@pytest.fixture(scope="module")
def items_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("items")
    path = demo.write_demo_items(str(d), 10)
    items = json.load(open(path))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    items += [
        {"id": "missing-file", "conversations": [{"from": "human", "value": "<|image|>hi"},
                                                 {"from": "gpt", "value": "x"}], "image": ["nope.png"]},
        {"id": "corrupt-image", "conversations": [{"from": "human", "value": "<|image|>hi"},
                                                  {"from": "gpt", "value": "x"}], "image": ["broken.png"]},
        {"id": "bad-turns", "conversations": [{"from": "gpt", "value": "hello"}]},
        {"id": "too-long", "conversations": [{"from": "human", "value": "word " * 300},
                                             {"from": "gpt", "value": "ok"}]},
        "not an object",
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        # half see-through: its codes must be those of the inference path, which crops, then blends on white
        {"id": "see-through", "conversations": [{"from": "human", "value": "<|image|>what?"},
                                                {"from": "gpt", "value": "glass"}], "image": ["glass.png"]},
    ]
    glass = np.zeros((40, 50, 4), np.uint8)
    glass[..., :3] = np.arange(40 * 50 * 3).reshape(40, 50, 3) % 251
    glass[..., 3] = np.arange(50)[None, :] * 5
    Image.fromarray(glass, "RGBA").save(d / "glass.png")
    path = d / "all.json"
    path.write_text(json.dumps(items))
    return str(path)


def _records(out):
    source, settings, kinds = pt.open_dataset(out)
    return [source[i] for i in range(len(source))], kinds


def test_records_equal_the_single_item_encoder_and_bad_items_are_listed(tmp_path, items_path, tokenizers):
    text, vq = tokenizers
    result = pt.pretokenize(items_path, str(tmp_path / "ds"), text, vq, SETTINGS, progress=False)
    assert result["complete"] and result["written"] == 12 and result["skipped"] == 5
    bad = [json.loads(line) for line in open(tmp_path / "ds" / pt.BAD_ITEMS_FILE)]
    # each kind's count, from the items themselves: generation draws a picture (the answer holds one)
    good_items = [it for it in json.load(open(items_path))
                  if isinstance(it, dict) and it.get("id") not in {b["id"] for b in bad} | {None}]
    drawn = sum(any(t["from"] == "gpt" and "<|image|>" in t["value"] for t in it["conversations"]) for it in good_items)
    assert result["kinds"] == {"understanding": 12 - drawn, "generation": drawn} and 0 < drawn < 12, result
    assert [b["id"] for b in bad] == ["missing-file", "corrupt-image", "bad-turns", "too-long", "all.json:14"]
    assert "no such file" in bad[0]["reason"].lower() and "SequenceTooLong" in bad[3]["reason"]
    assert "broken.png" in bad[1]["reason"]  # the picture is named, not "<28 bytes>"

    builder = tfds.builder_from_directory(str(tmp_path / "ds"))  # a plain TFDS dataset
    assert builder.info.splits["train"].num_examples == 12
    records, kinds = _records(str(tmp_path / "ds"))
    items = json.load(open(items_path))
    good = [it for it in items if isinstance(it, dict) and it.get("id") not in {b["id"] for b in bad}]
    root = os.path.dirname(items_path)
    for record, kind, item in zip(records, kinds, good):
        assert record["id"].decode() == item["id"]
        enc, pixels = encode_item(item, text, vq, image_root=root, vq_size=32, siglip_size=56)
        np.testing.assert_array_equal(record["tokens"], enc.tokens)
        np.testing.assert_array_equal(record["labels"], enc.labels)
        np.testing.assert_array_equal(record["is_continuous"], enc.is_continuous)
        np.testing.assert_array_equal(record["feature_index"], enc.feature_index)
        assert int(record["kind"]) == kind == int(any(enc.image_predicted))
        assert record["num_features"].tolist() == [16] * len(pixels)
        for raw, path in zip(record["image_bytes"], item.get("image", [])):
            assert bytes(raw) == open(os.path.join(root, path), "rb").read()
    assert kinds.tolist().count(1) == 5  # the demo alternates understanding / generation


def test_a_run_resumed_or_rerun_with_another_tokenizer_or_vqgan_is_refused(tmp_path, items_path, tokenizers):
    """A killed run resumed with another VQ-GAN finished with records of two VQ-GANs in one dataset
    (its first chunks' codes from one, the rest from the other), and a finished one rerun with another
    tokenizer said "nothing to do", keeping the old records: job.json named neither."""
    from unitoken_jax.models.vqgan import VQGANConfig
    from unitoken_jax.tokenizer.text import TextTokenizer
    from unitoken_jax.vq_tokenizer import VQTokenizer

    text, vq = tokenizers
    other_vq = VQTokenizer.random(VQGANConfig(**demo.DEMO_VQGAN), seed=1)
    other_text = TextTokenizer(demo.small.build(1))
    cut = str(tmp_path / "cut")
    pt.pretokenize(items_path, cut, text, vq, SETTINGS, progress=False, max_chunks=1)
    with pytest.raises(ValueError, match="started with another VQ-GAN"):
        pt.pretokenize(items_path, cut, text, other_vq, SETTINGS, progress=False)
    whole = str(tmp_path / "whole")
    assert pt.pretokenize(items_path, whole, text, vq, SETTINGS, progress=False)["complete"]
    with pytest.raises(ValueError, match="started with another text tokenizer"):
        pt.pretokenize(items_path, whole, other_text, vq, SETTINGS, progress=False)
    # the same tokenizer and VQ-GAN (other objects, the same files) resume as before
    same_text, same_vq = demo.demo_tokenizers()
    assert pt.pretokenize(items_path, cut, same_text, same_vq, SETTINGS, progress=False)["complete"]


def test_a_killed_run_resumes_to_the_same_dataset(tmp_path, items_path, tokenizers, monkeypatch):
    text, vq = tokenizers
    reference, _ = (pt.pretokenize(items_path, str(tmp_path / "whole"), text, vq, SETTINGS, progress=False),
                    None)
    partial = pt.pretokenize(items_path, str(tmp_path / "cut"), text, vq, SETTINGS, progress=False, max_chunks=1)
    assert partial == {"complete": False, "chunks_done": 1, "chunks": 5}
    with pytest.raises(FileNotFoundError, match="still being written"):
        pt.open_dataset(str(tmp_path / "cut"))

    calls = {"n": 0}
    original = pt._Chunk.run

    def dies_in_second_chunk(self, chunk):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, chunk)

    monkeypatch.setattr(pt._Chunk, "run", dies_in_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        pt.pretokenize(items_path, str(tmp_path / "cut"), text, vq, SETTINGS, progress=False)
    monkeypatch.setattr(pt._Chunk, "run", original)
    done = pt.pretokenize(items_path, str(tmp_path / "cut"), text, vq, SETTINGS, progress=False)
    assert done["written"] == reference["written"] and done["skipped"] == reference["skipped"]
    a, ka = _records(str(tmp_path / "whole"))
    b, kb = _records(str(tmp_path / "cut"))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(ka, kb)
    # every record's size, in order, for the packing bound (read here from the records themselves)
    for path, records in ((tmp_path / "whole", a), (tmp_path / "cut", b)):
        assert pt.record_sizes(str(path)).tolist() == [[len(r["tokens"]), int(np.sum(r["num_features"]))]
                                                       for r in records]

    with pytest.raises(ValueError, match="other settings"):
        pt.pretokenize(items_path, str(tmp_path / "cut"), text, vq, SETTINGS.__class__(vq_size=64), progress=False)


def test_a_job_resumed_from_chunks_without_sizes_writes_none_and_the_packing_bound_reads_records(
        tmp_path, items_path, tokenizers, monkeypatch):
    """A chunk written before the markers recorded sizes (2026-12-05) leaves the finished dataset
    without sizes.npy (never sizes for only some records, nor a stale file's); the packing bound
    then reads records."""
    from unitoken_jax.data.pipeline import InputPipeline, PipelineConfig

    text, vq = tokenizers
    out = str(tmp_path / "ds")
    pt.pretokenize(items_path, out, text, vq, SETTINGS, progress=False, max_chunks=1)
    marker = pt._marker(os.path.join(out, pt._PARTIAL), 0)  # the first chunk's, the one done
    old = json.load(open(marker))
    del old["sizes"]
    json.dump(old, open(marker, "w"))
    np.save(os.path.join(out, pt.SIZES_FILE), np.ones((3, 2), np.int32))  # a stale file is not kept either
    pt.pretokenize(items_path, out, text, vq, SETTINGS, progress=False)
    assert pt.record_sizes(out) is None and not os.path.exists(os.path.join(out, pt.SIZES_FILE))
    records, _ = _records(out)
    source, _, _ = pt.open_dataset(out)
    reads = []
    monkeypatch.setattr(type(source), "__getitem__",
                        lambda self, i, get=type(source).__getitem__: reads.append(i) or get(self, i))
    bound, counted = InputPipeline([out], PipelineConfig(rows=2, length=400, max_images=8, num_threads=1)).fill_bound()
    assert counted == len(records) and sorted(set(reads)) == list(range(len(records)))
    assert bound.shortest == min(len(r["tokens"]) for r in records)


def test_a_rerun_of_a_finished_job_does_no_work_and_changes_nothing(tmp_path, items_path, tokenizers, monkeypatch):
    """The finished dataset has no chunk markers left; a rerun (the same command again, or a pod's
    slower process) must not encode every item again into a partial folder nobody reads."""
    text, vq = tokenizers
    out = str(tmp_path / "ds")
    first = pt.pretokenize(items_path, out, text, vq, SETTINGS, progress=False)
    before = sorted(os.listdir(out)), sorted(os.listdir(os.path.join(out, pt._PARTIAL)))

    def no_work(self, chunk):
        raise AssertionError("a chunk of a finished dataset was encoded again")

    monkeypatch.setattr(pt._Chunk, "run", no_work)
    for index in (0, 1):
        again = pt.pretokenize(items_path, out, text, vq, SETTINGS, progress=False, process_index=index,
                               process_count=2 if index else 1)
        assert again == first
    assert (sorted(os.listdir(out)), sorted(os.listdir(os.path.join(out, pt._PARTIAL)))) == before
    with pytest.raises(ValueError, match="other settings"):  # still the same job only
        pt.pretokenize(items_path, out, text, vq, dataclasses.replace(SETTINGS, vq_size=64), progress=False)


def test_two_processes_write_the_dataset_one_process_writes(tmp_path, items_path, tokenizers):
    text, vq = tokenizers
    pt.pretokenize(items_path, str(tmp_path / "one"), text, vq, SETTINGS, progress=False)
    first = pt.pretokenize(items_path, str(tmp_path / "two"), text, vq, SETTINGS, progress=False,
                           process_index=1, process_count=2)
    assert not first["complete"]
    second = pt.pretokenize(items_path, str(tmp_path / "two"), text, vq, SETTINGS, progress=False,
                            process_index=0, process_count=2)
    assert second["complete"]
    a, _ = _records(str(tmp_path / "one"))
    b, _ = _records(str(tmp_path / "two"))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="process_index"):
        pt.pretokenize(items_path, str(tmp_path / "x"), text, vq, SETTINGS, process_index=2, process_count=2)


def test_discrete_only_records_have_no_continuous_part(tmp_path, items_path, tokenizers):
    """The ablation's layout: the same items with images as VQ codes only; the single-item encoder
    (used by the inference pipeline) agrees."""
    text, vq = tokenizers
    settings = pt.PretokenizeSettings(name="d", vq_size=32, siglip_size=56, max_length=400, chunk_size=4,
                                      vq_batch=4, continuous=False)
    pt.pretokenize(items_path, str(tmp_path / "d"), text, vq, settings, progress=False)
    records, _ = _records(str(tmp_path / "d"))
    items = {it["id"]: it for it in json.load(open(items_path)) if isinstance(it, dict)}
    with_images = [r for r in records if len(r["image_bytes"])]
    assert with_images and all(not r["is_continuous"].any() and r["num_features"].tolist() == [0]
                               for r in with_images)
    r = with_images[0]
    enc, _ = encode_item(items[r["id"].decode()], text, vq, image_root=os.path.dirname(items_path), vq_size=32,
                         siglip_size=56, continuous=False)
    np.testing.assert_array_equal(r["tokens"], enc.tokens)


def test_a_failing_picture_step_skips_its_item_not_the_run(tmp_path, tokenizers, monkeypatch):
    """Every per-picture step runs inside the per-item handling (the VQ crop sat outside it, so one
    picture that failed there aborted the whole run); a long strip is written."""
    from PIL import Image

    from unitoken_jax.tokenizer import images as image_io

    text, vq = tokenizers
    path = demo.write_demo_items(str(tmp_path / "items"), 4)
    items = json.load(open(path))
    Image.new("RGB", (60000, 1), (200, 30, 30)).save(tmp_path / "items" / "strip.png")
    Image.new("RGB", (7, 5), (0, 0, 0)).save(tmp_path / "items" / "odd.png")
    for name in ("strip", "odd"):
        items.append({"id": name, "image": [f"{name}.png"],
                      "conversations": [{"from": "human", "value": "<|image|>What is it?"}, {"from": "gpt", "value": "a"}]})
    json.dump(items, open(path, "w"))
    real_crop = image_io.vq_crop

    def crop_fails_on_odd(image, size, **kw):
        if image.size == (7, 5):
            raise MemoryError("cannot allocate")
        return real_crop(image, size, **kw)

    monkeypatch.setattr(image_io, "vq_crop", crop_fails_on_odd)
    result = pt.pretokenize(path, str(tmp_path / "ds"), text, vq, SETTINGS, progress=False)
    assert result["complete"] and result["written"] == 5 and result["skipped"] == 1
    bad = [json.loads(line) for line in open(tmp_path / "ds" / pt.BAD_ITEMS_FILE)]
    assert [b["id"] for b in bad] == ["odd"] and "MemoryError" in bad[0]["reason"]


def test_a_llava_items_image_placeholder_is_written_as_the_tokenizers_image_token(tmp_path, tokenizers):
    """A LLaVA-style item (`<image>` in the question, the picture under 'image') is written as the
    reference's data carry it: the picture in front and `<image>` as the tokenizer's own token."""
    from unitoken_jax.tokenizer import small
    from unitoken_jax.tokenizer.text import TextTokenizer

    _, vq = tokenizers
    spec = json.loads(small.build())
    for entry in spec["added_tokens"]:  # as transformers' Chameleon tokenizer names id 8711
        if entry["id"] == 8711:
            entry["content"] = "<image>"
    spec["model"]["vocab"]["<image>"] = spec["model"]["vocab"].pop("<reserved08707>")
    (tmp_path / "items").mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "items" / "red.png")
    item = {"id": "llava", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                                 {"from": "gpt", "value": "red"}]}
    (tmp_path / "items" / "items.json").write_text(json.dumps([item]))
    result = pt.pretokenize(str(tmp_path / "items" / "items.json"), str(tmp_path / "ds"),
                            TextTokenizer(json.dumps(spec)), vq, SETTINGS, progress=False)
    assert result["written"] == 1
    (record,), _ = _records(str(tmp_path / "ds"))
    tokens = record["tokens"].tolist()
    assert tokens.count(8711) == 1 and tokens[tokens.index(8196) + 1:tokens.index(8711)] == [
        TextTokenizer(json.dumps(spec)).encode_text(" ")[0]]  # picture, a space, <image>, the question


def test_an_items_file_edited_between_a_kill_and_the_restart_is_refused(tmp_path, items_path, tokenizers):
    """Same path and count, other order: the resume check compared only those and resumed into
    duplicated and lost records (issue 15, item 5); the job now fingerprints the content."""
    text, vq = tokenizers
    items = json.load(open(items_path))
    path = tmp_path / "items.json"
    path.write_text(json.dumps(items))
    out = str(tmp_path / "ds")
    image_root = os.path.dirname(items_path)
    assert not pt.pretokenize(str(path), out, text, vq, SETTINGS, progress=False, max_chunks=1,
                              image_root=image_root)["complete"]
    path.write_text(json.dumps(items[::-1]))
    with pytest.raises(ValueError, match="changed since"):
        pt.pretokenize(str(path), out, text, vq, SETTINGS, progress=False, image_root=image_root)
    path.write_text(json.dumps(items))  # put back: the run goes on
    assert pt.pretokenize(str(path), out, text, vq, SETTINGS, progress=False, image_root=image_root)["complete"]


@pytest.mark.parametrize("holder", ["gone", "this process"])
def test_a_finalize_that_died_is_finished_by_a_rerun(tmp_path, items_path, tokenizers, monkeypatch, holder):
    """A crash while writing the metadata left the lock behind, and every rerun said another
    process was finishing (issue 15, item 4): an exception now releases the lock, a lock whose
    holder is gone is taken over, and shards moved before the crash are not moved again. A lock
    naming the rerun's own pid (a container restarted with the same host name and pid: PID 1 in
    Kubernetes) was waited on forever."""
    import socket
    import subprocess

    import tensorflow_datasets as tfds

    text, vq = tokenizers
    whole = pt.pretokenize(items_path, str(tmp_path / "whole"), text, vq, SETTINGS, progress=False)
    out = str(tmp_path / "ds")

    def dies(*args, **kwargs):
        raise RuntimeError("killed while writing the metadata")

    monkeypatch.setattr(tfds.folder_dataset, "write_metadata", dies)
    with pytest.raises(RuntimeError, match="killed"):
        pt.pretokenize(items_path, out, text, vq, SETTINGS, progress=False)
    monkeypatch.undo()
    lock = os.path.join(out, pt._PARTIAL, "finalize.lock")
    assert not os.path.exists(lock)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a hard kill: the lock stays, naming a process that no longer exists
    with open(lock, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": gone.pid if holder == "gone" else os.getpid()}, f)
    done = pt.pretokenize(items_path, out, text, vq, SETTINGS, progress=False)
    assert done["complete"] and done["written"] == whole["written"] and done["skipped"] == whole["skipped"]
    a, _ = _records(str(tmp_path / "whole"))
    b, _ = _records(out)
    assert [r["id"] for r in a] == [r["id"] for r in b]


_WRITE_JOB_JSON = """
import os, sys, time
from unitoken_jax.data import pretokenize as pt
path, ready, go = sys.argv[1:]
open(ready, "w").close()
while not os.path.exists(go):  # all write at once
    time.sleep(0.01)
for i in range(1000):
    pt._write_json(path, {"i": i})
"""


def test_the_hosts_of_a_pod_writing_job_json_at_once_do_not_crash_each_other(tmp_path):
    """Every process wrote through one `job.json.tmp`: a host whose file another had already moved
    crashed with FileNotFoundError when the hosts started together, as the README says to."""
    import subprocess
    import sys
    import time

    (tmp_path / "out").mkdir()
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, "-c", _WRITE_JOB_JSON, str(tmp_path / "out" / "job.json"),
                                   str(tmp_path / f"ready{i}"), str(go)], stderr=subprocess.PIPE, text=True)
                 for i in range(4)]
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and all(p.poll() is None for p in processes):
        time.sleep(0.05)
    go.touch()
    errors = [p.communicate(timeout=300)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, "\n".join(errors)
    assert os.listdir(tmp_path / "out") == ["job.json"]


def test_two_hosts_started_at_once_with_other_settings_make_no_dataset_of_both(tmp_path, items_path, monkeypatch):
    """Each host looked for job.json, found none and wrote its own: started together with other
    settings (another --vq-size), both passed, and one dataset held records of both. The second
    host's check runs here inside the first one's write (where the window was) or after it."""
    import dataclasses

    out = tmp_path / "ds"
    os.makedirs(out / pt._PARTIAL)
    other = dataclasses.replace(SETTINGS, vq_size=48)
    real, outcome = os.replace, []

    def second_host():
        outcome.append("started")
        try:
            pt._check_settings(str(out), other, items_path, 8)
            outcome[-1] = "passed"
        except ValueError as e:
            outcome[-1] = str(e)

    def replace(src, dst):  # the first host's write of job.json, with the second host's check inside it
        if os.path.basename(dst) == "job.json" and not outcome:
            second_host()
        return real(src, dst)
    monkeypatch.setattr(pt.os, "replace", replace)
    pt._check_settings(str(out), SETTINGS, items_path, 8)
    if not outcome:
        second_host()
    assert len(outcome) == 1 and "holds a pre-tokenization started with other settings" in outcome[0], outcome
    assert json.loads((out / pt._PARTIAL / "job.json").read_text())["settings"] == SETTINGS.to_json()


def test_a_lock_found_empty_is_waited_for_not_taken_over_while_its_maker_writes_its_name(tmp_path):
    """An empty finalize lock was taken for a dead process's: on a file system that shows a file's
    contents at close (NFS, a mounted bucket), another host's live lock reads empty for a while, and
    both hosts finalized (one crashed, its markers removed by the other)."""
    import threading
    import time

    lock = tmp_path / "finalize.lock"
    lock.write_text("")  # another host made it and is writing its name

    def name_it():
        time.sleep(1.0)
        lock.write_text(json.dumps({"host": "another-host", "pid": 4242}))
    threading.Thread(target=name_it).start()
    assert pt._take_finalize_lock(str(lock)) is False
    assert json.loads(lock.read_text())["host"] == "another-host"
    # and one left empty (its maker died before naming itself) is taken over once it is old
    lock.write_text("")
    old = time.time() - 2 * pt._SETTLE_S
    os.utime(lock, (old, old))
    assert pt._take_finalize_lock(str(lock)) is True
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_anyres_pinpoints_that_are_not_whole_tiles_are_refused_when_the_settings_are_made():
    """They were written into the dataset, and training failed on its first batch."""
    with pytest.raises(ValueError, match=re.escape("pinpoints [(56, 100)] are not whole multiples of the 56-px")):
        pt.PretokenizeSettings(siglip_size=56, anyres=True, anyres_grid_pinpoints=((56, 100), (112, 56)))
    assert pt.PretokenizeSettings(siglip_size=56, anyres=True, anyres_grid_pinpoints=((56, 112), (112, 56)))


def test_malformed_items_are_skipped_and_listed_and_malformed_files_named(tmp_path, tokenizers, capsys):
    """A message that is a string or null and an "image" of 5 aborted the whole run; a broken
    JSONL line was reported without its file or line; a run where every item was bad exited 0 (issue 15)."""
    from unitoken_jax import cli

    text, vq = tokenizers
    ok = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = [{"id": "string-message", "conversations": ["hi", {"from": "gpt", "value": "x"}]},
           {"id": "null-message", "conversations": [None, {"from": "gpt", "value": "x"}]},
           {"id": "image-number", "image": 5, "conversations": [{"from": "human", "value": "<|image|>hi"},
                                                                 {"from": "gpt", "value": "x"}]},
           {"id": "image-list-of-numbers", "image": [1, 2],
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
           # the pipeline's prompt form: it had been written as a sample that teaches answering nothing
           {"id": "unanswered", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]},
           # LLaVA-style questions whose pictures are not under 'image' were trained as text, about no picture
           {"id": "images-plural", "images": ["a.png"], "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                                          {"from": "gpt", "value": "x"}]},
           {"id": "no-picture", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                  {"from": "gpt", "value": "red"}]},
           # OpenAI's messages, and 'content' for 'value': named, not "turn 0 has no text (value null)"
           {"id": "openai", "conversations": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "x"}]},
           {"id": "content", "conversations": [{"from": "human", "content": "hi"}, {"from": "gpt", "content": "x"}]}]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [ok, *bad]) + "\n")
    result = pt.pretokenize(str(path), str(tmp_path / "ds"), text, vq, SETTINGS, progress=False)
    assert result["written"] == 1 and result["skipped"] == 9
    assert "turn 1 has no text (value null)" in json.loads(open(tmp_path / "ds" / pt.BAD_ITEMS_FILE).readlines()[4])[
        "reason"]
    listed = [json.loads(line) for line in open(tmp_path / "ds" / pt.BAD_ITEMS_FILE)]
    assert [b["id"] for b in listed] == [b["id"] for b in bad]
    assert all("ConversationError" in b["reason"] for b in listed)
    assert "'image' must be a file name or a list of them (from Python also pictures: PIL images, uint8 arrays" \
        in listed[2]["reason"]  # what encode_item takes: the message once named file names only
    assert "pictures are under 'images'; they go under 'image'" in listed[5]["reason"]
    assert "holds '<image>' (LLaVA's picture placeholder) but the item names no picture" in listed[6]["reason"]
    assert "OpenAI's format" in listed[7]["reason"]
    assert "has no 'value' (its keys: from, content)" in listed[8]["reason"]
    with pytest.raises(ValueError, match="image_root /no/such/dir: no such directory"):  # every picture item skipped
        pt.pretokenize(str(path), str(tmp_path / "ds2"), text, vq, SETTINGS, progress=False, image_root="/no/such/dir")

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ok) + "\n" + '{"id": "x", "conversations": [\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl line 2 is not valid JSON"):
        pt.read_items(str(broken))
    (tmp_path / "broken.json").write_text('[{"id": 1},')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON \(line 1"):
        pt.read_items(str(tmp_path / "broken.json"))

    all_bad = tmp_path / "all_bad.jsonl"
    all_bad.write_text("\n".join(json.dumps(x) for x in bad) + "\n")
    code = cli.main(["pretokenize", str(all_bad), "--out", str(tmp_path / "none"), "--tokenizer", "demo",
                     "--vqgan", "demo"])  # the demo's sizes by default (512 px died inside XLA with its VQ-GAN)
    assert code == 1 and "no item" in capsys.readouterr().err
    with open(tmp_path / "none" / pt.SETTINGS_FILE) as f:
        assert (json.load(f)["vq_size"], json.load(open(tmp_path / "none" / pt.SETTINGS_FILE))["siglip_size"]) == (32, 56)


@pytest.mark.parametrize("field,value,says", [
    ("chunk_size", 0, "chunk_size=0 must be a whole number of at least 1"),  # was a ZeroDivisionError
    ("vq_batch", 0, "vq_batch=0 must be"),  # was "range() arg 3 must not be zero"
    ("patch", 0, "patch=0 must be"),  # was a ZeroDivisionError
    ("siglip_size", -1, "siglip_size=-1 must be"),  # was written, with tiles of -1 px
    ("siglip_size", 10, "siglip_size=10 is smaller than one patch (14 px)"),
    ("max_length", -5, "max_length=-5 must be"),  # skipped every item
    ("max_length", 0, "max_length=0 must be a whole number of at least 1 (None: no limit, which the CLI's"),
    ("vq_size", True, "vq_size=True must be a whole number"),  # (a bool was taken as 1)
    # TFDS finds shards by NAME-SPLIT...: these wrote every chunk, then failed at the end, on every rerun
    ("name", "my-data", "name='my-data': a dataset name takes letters, digits and '_' only"),
    ("name", "my.data", "name='my.data'"), ("name", "my data", "name='my data'"), ("name", "", "name=''"),
    ("split", "dev.1", "split='dev.1': a split name takes"),
])
def test_settings_that_cannot_pretokenize_are_refused_as_they_are_made(field, value, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        pt.PretokenizeSettings(**{field: value})


def test_numpy_whole_numbers_are_settings_as_python_ints():
    """A NumPy integer passed the checks and then failed writing job.json ("Object of type int64 is not
    JSON serializable"), leaving its temporary file."""
    s = pt.PretokenizeSettings(chunk_size=np.int64(4), max_length=np.int32(300))
    assert type(s.chunk_size) is int and type(s.max_length) is int
    back = pt.PretokenizeSettings.from_json(json.loads(json.dumps(s.to_json())))
    assert (back.chunk_size, back.max_length) == (4, 300)


def test_a_missing_or_empty_items_file_and_an_impossible_crop_are_refused_before_anything_is_written(
        tmp_path, items_path, tokenizers, capsys):
    from unitoken_jax import cli

    text, vq = tokenizers
    for path, says in ((tmp_path / "missing.json", "missing.json: no such file"),
                       (tmp_path, "a folder, not a file")):
        with pytest.raises(ValueError, match=re.escape(says)):
            pt.pretokenize(str(path), str(tmp_path / "ds"), text, vq, SETTINGS, progress=False)
    (tmp_path / "empty.json").write_text("[]")  # "0 items written, 0 skipped", then "no item could be used"
    with pytest.raises(ValueError, match="empty.json holds no items"):
        pt.pretokenize(str(tmp_path / "empty.json"), str(tmp_path / "ds"), text, vq, SETTINGS, progress=False)
    from unitoken_jax.vq_tokenizer import VQTokenizer

    big = VQTokenizer.random(dataclasses.replace(vq.config, n_embed=text.num_codes + 1))  # (each item with a code
    with pytest.raises(ValueError, match=f"the VQ-GAN has {text.num_codes + 1} codes and the text tokenizer "  # past
                                         f"{text.num_codes} image tokens"):  # them was skipped, one by one)
        pt.pretokenize(items_path, str(tmp_path / "ds"), text, big, SETTINGS, progress=False)
    odd = dataclasses.replace(SETTINGS, vq_size=33)  # failed inside the VQ-GAN, after the progress bar began
    with pytest.raises(ValueError, match=re.escape(f"vq_size=33: the VQ-GAN takes sides that are multiples of "
                                                   f"{vq.config.downsample_factor} px")):
        pt.pretokenize(items_path, str(tmp_path / "ds"), text, vq, odd, progress=False)
    for kwargs, says in (({"process_count": 0}, "process_count=0 must be a whole number of at least 1"),  # was
                         ({"process_count": "2"}, "process_count='2' must be"),  # "not in 0..-1", then a TypeError
                         ({"process_index": 0.0}, "process_index 0.0 is not in 0..0"),
                         ({"max_chunks": -1}, "max_chunks=-1 must be a whole number")):
        with pytest.raises(ValueError, match=re.escape(says)):
            pt.pretokenize(items_path, str(tmp_path / "ds"), text, vq, SETTINGS, progress=False, **kwargs)
    assert not (tmp_path / "ds").exists()
    # the command refuses the same numbers by option, before its tokenizers load
    for option, value in (("--chunk-size", "0"), ("--vq-batch", "0"), ("--patch", "0"), ("--siglip-size", "-1"),
                          ("--max-length", "-5"), ("--vq-size", "0"), ("--process-count", "0"),
                          ("--process-index", "-1")):
        with pytest.raises(SystemExit):
            cli.main(["pretokenize", items_path, "--out", str(tmp_path / "ds"), "--tokenizer", "demo",
                      "--vqgan", "demo", option, value])
        err = capsys.readouterr().err
        assert f"argument {option}: {value} is out of range" in err, err
    # no tokenizers given: the demo's are named as a way (only --help had named them)
    assert cli.main(["pretokenize", items_path, "--out", str(tmp_path / "ds")]) == 2
    assert "or --tokenizer demo --vqgan demo for the demo's small ones" in capsys.readouterr().err
    # a name TFDS cannot find again is refused by the settings, before the tokenizers load
    for option, value, says in (("--name", "my-data", "name='my-data': a dataset name takes letters, digits"),
                                ("--split", "dev.1", "split='dev.1': a split name takes letters, digits")):
        assert cli.main(["pretokenize", items_path, "--out", str(tmp_path / "ds"), "--tokenizer", "demo",
                         "--vqgan", "demo", option, value]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_a_users_odd_items_are_skipped_by_reason_and_odd_files_named(tmp_path, tokenizers):
    """An empty answer was written as a sample that teaches <eot> alone (null is refused for just
    that); an empty picture name was "IsADirectoryError"; a .JSONL file was read as one JSON list;
    a file not in UTF-8 was a bare UnicodeDecodeError naming no file."""
    text, vq = tokenizers
    ok = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    odd = [{"id": "empty-answer", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
           {"id": "blank-answer", "conversations": [{"from": "human", "value": "hi"},
                                                    {"from": "gpt", "value": "hello"},
                                                    {"from": "human", "value": "and?"},
                                                    {"from": "assistant", "value": " \n"}]},
           {"id": "empty-name", "image": [""], "conversations": [{"from": "human", "value": "<|image|>hi"},
                                                                {"from": "gpt", "value": "x"}]}]
    path = tmp_path / "ITEMS.JSONL"
    path.write_text("\n".join(json.dumps(x) for x in [ok, *odd]) + "\n")
    result = pt.pretokenize(str(path), str(tmp_path / "ds"), text, vq, SETTINGS, progress=False)
    assert (result["written"], result["skipped"]) == (1, 3)
    listed = {b["id"]: b["reason"] for b in map(json.loads, open(tmp_path / "ds" / pt.BAD_ITEMS_FILE))}
    assert "turn 1 is an empty answer" in listed["empty-answer"]
    assert "turn 3 is an empty answer" in listed["blank-answer"]
    assert "an empty picture name under 'image'" in listed["empty-name"]
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"id": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.json is not UTF-8 text \(invalid continuation byte\)"):
        pt.read_items(str(latin))
    # a BOM (Notepad's UTF-8) was refused as "not valid JSON (... Unexpected UTF-8 BOM); a .jsonl file takes
    # one item per line"; the .jsonl hint is for a file of lines named .json
    for name, text in (("bom.json", json.dumps([ok])), ("bom.jsonl", json.dumps(ok) + "\n")):
        (tmp_path / name).write_bytes(text.encode("utf-8-sig"))
        assert pt.read_items(str(tmp_path / name)) == [ok]
    (tmp_path / "lines.json").write_text(json.dumps(ok) + "\n" + json.dumps(ok) + "\n")
    with pytest.raises(ValueError, match=r"lines\.json is not valid JSON \(line 2, column 1: Extra data\); a \.jsonl"):
        pt.read_items(str(tmp_path / "lines.json"))
    (tmp_path / "broken.json").write_text('[{"id": 1},')
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON \(line 1, column \d+: [^)]*\)$"):
        pt.read_items(str(tmp_path / "broken.json"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"a relative path is taken from the current directory, "
                                                          f"{os.getcwd()}")):
        pt.open_dataset("no/such/dataset")


def test_a_rerun_with_another_picture_folder_or_setting_is_refused_naming_what_differs(tmp_path, tokenizers):
    """A first run with the wrong --image-root skipped every picture item; the rerun with the right
    one said "complete already", and one fixed mid-way mixed both (the folder was no part of the job).
    A refusal printed both whole records, naming no setting."""
    text, vq = tokenizers
    items_dir = tmp_path / "items"
    items_dir.mkdir()
    path = demo.write_demo_items(str(tmp_path), 6)  # pictures beside the items file, in tmp_path
    moved = items_dir / "items.json"
    os.replace(path, moved)
    first = pt.pretokenize(str(moved), str(tmp_path / "ds"), text, vq, SETTINGS, progress=False, max_chunks=1)
    assert not first.get("complete")
    with pytest.raises(ValueError, match=re.escape(f"picture folder (--image-root): {str(items_dir)!r} there, "
                                                   f"{str(tmp_path)!r} now")):
        pt.pretokenize(str(moved), str(tmp_path / "ds"), text, vq, SETTINGS, progress=False,
                       image_root=str(tmp_path))
    with pytest.raises(ValueError, match=re.escape("vq_size: 32 there, 64 now")):
        pt.pretokenize(str(moved), str(tmp_path / "ds"), text, vq, dataclasses.replace(SETTINGS, vq_size=64),
                       progress=False)
    # a job.json written before the folder was recorded is not held to it
    job_path = tmp_path / "ds" / pt._PARTIAL / "job.json"
    job = json.load(open(job_path))
    del job["image_root"]
    job_path.write_text(json.dumps(job))
    done = pt.pretokenize(str(moved), str(tmp_path / "ds"), text, vq, SETTINGS, progress=False)
    assert done["complete"]
