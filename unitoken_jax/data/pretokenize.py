"""Pre-tokenization: conversations in the reference's JSON format (plus their image files) -> a TFDS
dataset in ArrayRecord format that the Grain pipeline reads.

Each record holds one item, ready to pack: token ids, labels, the continuous-position mask and
feature indices (image-local, as `encode_conversation` makes them), the image files' bytes (the
SigLIP / AnyRes preprocessing runs in the input pipeline's workers, so the dataset stays small and
any SigLIP resolution can be used later), the number of SigLIP features each image takes, and
whether the item is an understanding or a generation item (generation = it predicts an image).
The VQ codes are already inside the token ids: images are cropped and encoded in large,
fixed-size jit batches.

Work is split into chunks of `chunk_size` items; chunk c belongs to process `c % process_count`,
so several processes or hosts can share one dataset. A finished chunk leaves a marker file, so a
killed run picks up where it stopped. Items that cannot be used (unreadable image, malformed
conversation, longer than `max_length`) are skipped, counted and listed in `bad_items.jsonl`;
they never stop the run. When every chunk is done, the process that finishes last writes the
TFDS metadata (`dataset_info.json`, `features.json`); the dataset then opens with
`tfds.builder_from_directory(out_dir)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import socket
import time
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from unitoken_jax.convert.files import pid_alive
from unitoken_jax.tokenizer import anyres as anyres_lib
from unitoken_jax.tokenizer import images as image_io
from unitoken_jax.tokenizer.conversation import (ASSISTANT_ROLES, ConversationError, ImageInput, encode_conversation,
                                                 image_list)
from unitoken_jax.tokenizer.text import TextTokenizer

log = logging.getLogger(__name__)

KINDS = ("understanding", "generation")
SETTINGS_FILE = "unitoken_pretokenize.json"
BAD_ITEMS_FILE = "bad_items.jsonl"
KINDS_FILE = "kinds.npy"  # the kind of every record, in order: the pipeline splits by kind without reading records
# every record's (tokens, image features), in order: the packing bound at a run's start reads no records
SIZES_FILE = "sizes.npy"
# the text tokenizer's and the VQ-GAN's fingerprints (sha256) a dataset was made with: training refuses
# to mix datasets whose token ids or codes mean different things (`made_with`)
MADE_WITH_FILE = "made_with.json"
FINGERPRINTS = {"tokenizer_sha256": "text tokenizer", "vqgan_sha256": "VQ-GAN"}
_PARTIAL = ".partial"
_FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


DISCRETE_LENGTH = 4096  # the released model's positions, which the reference spends on discrete tokens


@dataclasses.dataclass(frozen=True)
class PretokenizeSettings:
    """How images are laid out; the input pipeline reads these back from the dataset."""

    name: str = "unitoken"
    split: str = "train"
    vq_size: int = 512  # VQ crop side (pixels); codes grid = vq_size / downsample factor
    siglip_size: int = 384  # SigLIP tile side
    patch: int = 14
    anyres: bool = False
    anyres_grid_pinpoints: tuple[tuple[int, int], ...] = ()  # default: the reference's, scaled to siglip_size
    continuous: bool = True  # False: images as discrete codes only, no SigLIP features (an ablation)
    # longer items are skipped and listed; "auto": 4,096, and with AnyRes (continuous) 4,096 plus the
    # largest picture's SigLIP block (`anyres.max_block`), the reference's budget
    max_length: int | str | None = "auto"
    chunk_size: int = 512
    vq_batch: int = 32  # images per VQ-GAN call (a fixed shape: one compilation)

    def __post_init__(self):
        # TFDS finds the shards again by their file names, `{name}-{split}.array_record-...`: a name with
        # '-', '.' or a space wrote every chunk and then failed at the end, on every rerun too
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ValueError(f"name={self.name!r}: a dataset name takes letters, digits and '_' only (its shard "
                             "files are named NAME-SPLIT...)")
        if not isinstance(self.split, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", self.split):
            raise ValueError(f"split={self.split!r}: a split name takes letters, digits, '_' and '-' only")
        for name in ("vq_size", "siglip_size", "patch", "chunk_size", "vq_batch"):
            if not _whole(getattr(self, name), 1):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a whole number of at least 1")
            object.__setattr__(self, name, int(getattr(self, name)))  # (a NumPy integer is no JSON for job.json)
        if self.siglip_size < self.patch:
            raise ValueError(f"siglip_size={self.siglip_size} is smaller than one patch ({self.patch} px)")
        if self.anyres:  # (checked here, not when the first batch is read: the pictures' tiles are cut in training)
            anyres_lib.check_pinpoints(self.pinpoints(), self.siglip_size)
        if self.max_length == "auto":
            extra = anyres_lib.max_block(self.siglip_size, self.patch, self.pinpoints()) \
                if self.anyres and self.continuous else 0
            object.__setattr__(self, "max_length", DISCRETE_LENGTH + extra)
        if self.max_length is not None and not _whole(self.max_length, 1):
            raise ValueError(f"max_length={self.max_length!r} must be a whole number of at least 1 (None: no limit, "
                             "which the CLI's --max-length spells 0)")
        if self.max_length is not None:
            object.__setattr__(self, "max_length", int(self.max_length))

    def pinpoints(self) -> tuple[tuple[int, int], ...]:
        return anyres_lib.check_pinpoints(self.anyres_grid_pinpoints, self.siglip_size)  # (empty: the defaults)

    def to_json(self) -> dict:
        """The settings as JSON values (what a dataset's pretokenize record keeps; `from_json` reads it)."""
        return dict(dataclasses.asdict(self), anyres_grid_pinpoints=[list(p) for p in self.pinpoints()])

    @classmethod
    def from_json(cls, d: dict) -> "PretokenizeSettings":
        """Settings from `to_json`'s dict (keys it does not know, e.g. of a newer version, are left out)."""
        d = dict(d)
        d["anyres_grid_pinpoints"] = tuple(tuple(p) for p in d.get("anyres_grid_pinpoints", ()))
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def features_dict():
    """The TFDS features of a pretokenized item: its id and kind, token ids and labels (picture codes among
    them), where SigLIP features go (`is_continuous`, `feature_index`), its pictures' bytes and feature counts."""
    import tensorflow_datasets as tfds

    seq = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)  # noqa: E731
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "kind": tfds.features.Scalar(dtype=np.int32, doc="0 understanding, 1 generation"),
        "tokens": seq(np.int32),
        "labels": seq(np.int32),
        "is_continuous": seq(np.bool_),
        "feature_index": seq(np.int32),
        "image_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        "num_features": seq(np.int32),
    })


def read_items(path: str) -> list[dict[str, Any]]:
    """A .json list of items or a .jsonl file of one item per line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'} (the items: "
                         "a .json list or a .jsonl file)")
    with open(path, encoding="utf-8-sig") as f:  # (a BOM, as Windows' editors write, is no JSON: skipped)
        try:
            return _parse_items(path, f)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None


def _parse_items(path: str, f) -> list[dict[str, Any]]:
    if path.lower().endswith(".jsonl"):
        items = []
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno})") from None
    else:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            hint = "; a .jsonl file takes one item per line" if e.msg == "Extra data" else ""  # (JSONL named .json)
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}){hint}") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a list of items, got {type(items).__name__}")
    return items


def image_inputs_layout(picture, settings: PretokenizeSettings) -> tuple[np.ndarray, int]:
    """(continuous-block entries, number of SigLIP features) of one picture, without its pixels."""
    side = settings.siglip_size // settings.patch
    if not settings.continuous:
        return np.zeros(0, np.int64), 0
    if not settings.anyres:
        return anyres_lib.base_entries(side), side * side
    best = anyres_lib.select_best_resolution(picture.size, settings.pinpoints())
    grid = (best[0] // settings.siglip_size, best[1] // settings.siglip_size)
    return anyres_lib.anyres_entries(grid, picture.size, side), (1 + grid[0] * grid[1]) * side * side


class _Chunk:
    """Items of one chunk -> serialized records and a list of bad items."""

    def __init__(self, tokenizer: TextTokenizer, vq, settings: PretokenizeSettings, image_root: str, source: str):
        self.tokenizer, self.vq, self.settings = tokenizer, vq, settings
        self.image_root, self.source = image_root, source

    def _path(self, p: str) -> str:
        if not p.strip():  # (else the image root itself: "IsADirectoryError")
            raise ValueError("an empty picture name under 'image'")
        return p if os.path.isabs(p) else os.path.join(self.image_root, p)

    def _codes(self, crops) -> list[np.ndarray]:
        b = self.settings.vq_batch
        out = []
        for i in range(0, len(crops), b):
            batch = np.stack(crops[i:i + b])
            n = len(batch)
            if n < b:  # a fixed batch shape: one compilation for the whole run
                batch = np.concatenate([batch, np.zeros((b - n, *batch.shape[1:]), batch.dtype)])
            out.extend(self.vq.encode(batch)[:n])
        return out

    def run(self, items: Sequence[tuple[int, dict]]) -> tuple[list[bytes], list[int], list[list[int]], list[dict]]:
        """(serialized records, their kinds, their [tokens, image features], bad items)."""
        loaded, bad, kinds, sizes = [], [], [], []

        def fail(index, item, reason):
            bad.append({"index": index, "id": _item_id(item, self.source, index), "reason": reason})

        for index, item in items:
            try:
                if not isinstance(item, dict):
                    raise ConversationError(f"an item must be a JSON object, not {type(item).__name__}")
                turns = item.get("conversations")
                listed = turns if isinstance(turns, list) else []
                empty = [i for i, t in enumerate(listed) if isinstance(t, dict) and "value" in t and t["value"] is None]
                if empty:  # (the pipeline's prompt form: an answer to write, not one to learn: one <eot> labelled)
                    raise ConversationError(f"turn {empty[0]} has no text (value null): a training item needs every "
                                            "turn written out")
                # an empty answer, the same record as null's: its turn teaches <eot> alone
                empty = [i for i, t in enumerate(listed) if isinstance(t, dict) and t.get("from") in ASSISTANT_ROLES
                         and isinstance(t.get("value"), str) and not t["value"].strip()]
                if empty:
                    raise ConversationError(f"turn {empty[0]} is an empty answer: a training item needs every answer "
                                            "written out")
                paths = [str(p) for p in image_list(item)]
                if not paths and isinstance(turns, list) and any(
                        isinstance(t, dict) and isinstance(t.get("value"), str) and "<image>" in t["value"]
                        for t in turns):  # (trained as text, the question would be about no picture)
                    raise ConversationError("a turn holds '<image>' (LLaVA's picture placeholder) but the item "
                                            "names no picture: give its file under 'image'")
                raw = []
                for p in paths:
                    with open(self._path(p), "rb") as f:
                        raw.append(f.read())
                # as loaded (transparency kept): the VQ side blends it on white after its crop, as the
                # reference's tokenizer does; the SigLIP side (the input pipeline) drops it
                pictures = [image_io.load_image(r, what=p) for r, p in zip(raw, paths)]
                # every per-picture step here, inside the per-item handling: a picture that fails any
                # of them skips its item, never the run
                crops = [image_io.vq_pixels(image_io.vq_crop(pic, self.settings.vq_size)) for pic in pictures]
                layouts = [image_inputs_layout(pic, self.settings) for pic in pictures]
            except (OSError, ValueError, MemoryError) as e:  # ImageError and ConversationError are ValueErrors
                fail(index, item, f"{type(e).__name__}: {e}")
                continue
            loaded.append((index, item, raw, crops, layouts))

        codes = iter(self._codes([c for *_, crops, _ in loaded for c in crops]))
        features = features_dict()
        records = []
        for index, item, raw, crops, layouts in loaded:
            inputs = [ImageInput(next(codes), entries, n) for entries, n in layouts]
            try:
                enc = encode_conversation(item, inputs, self.tokenizer, max_length=self.settings.max_length,
                                          llava_image=True)
            except (ConversationError, ValueError) as e:
                fail(index, item, f"{type(e).__name__}: {e}")
                continue
            kind = 1 if any(enc.image_predicted) else 0
            kinds.append(kind)
            sizes.append([len(enc.tokens), sum(i.num_features for i in inputs)])
            records.append(features.serialize_example({
                "id": _item_id(item, self.source, index), "kind": kind, "tokens": enc.tokens, "labels": enc.labels,
                "is_continuous": enc.is_continuous, "feature_index": enc.feature_index, "image_bytes": raw,
                "num_features": np.array([i.num_features for i in inputs], np.int32)}))
        return records, kinds, sizes, sorted(bad, key=lambda b: b["index"])


def _whole(value, least: int) -> bool:
    """Whether `value` is an int (never a bool: True was taken as 1) of at least `least`."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value >= least


def _item_id(item, source: str, index: int) -> str:
    if isinstance(item, dict) and isinstance(item.get("id"), (str, int)):
        return str(item["id"])
    return f"{os.path.basename(source)}:{index}"


def pretokenize(items_path: str, out_dir: str, tokenizer: TextTokenizer, vq, settings: PretokenizeSettings, *,
                image_root: str | None = None, process_index: int = 0, process_count: int = 1,
                progress: bool = True, max_chunks: int | None = None) -> dict[str, Any]:
    """Writes this process's chunks of `items_path` under `out_dir`, then the TFDS metadata if every
    chunk of every process is done. `max_chunks` stops after that many new chunks (for tests and
    time-boxed jobs). Returns a summary: items written and skipped, and whether the dataset is complete."""
    if not _whole(process_count, 1):
        raise ValueError(f"process_count={process_count!r} must be a whole number of at least 1")
    if not _whole(process_index, 0) or not process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in 0..{process_count - 1}")
    if max_chunks is not None and not _whole(max_chunks, 0):
        raise ValueError(f"max_chunks={max_chunks!r} must be a whole number (None: every chunk)")
    if vq.config.n_embed > tokenizer.num_codes:  # (each item holding a code past them was skipped, one by one)
        raise ValueError(f"the VQ-GAN has {vq.config.n_embed} codes and the text tokenizer {tokenizer.num_codes} image "
                         "tokens: codes past them have no token. Give a tokenizer with as many image tokens, or a "
                         "VQ-GAN with at most as many codes")
    factor = vq.config.downsample_factor
    if settings.vq_size % factor:
        raise ValueError(f"vq_size={settings.vq_size}: the VQ-GAN takes sides that are multiples of {factor} px "
                         f"(e.g. {max(factor, settings.vq_size // factor * factor)})")
    items = read_items(items_path)
    if not items:
        raise ValueError(f"{items_path} holds no items")
    if image_root is not None and not os.path.isdir(image_root):  # (else every picture item is skipped)
        raise ValueError(f"image_root {image_root}: no such directory")
    image_root = os.path.dirname(os.path.abspath(items_path)) if image_root is None else image_root
    n_chunks = max(1, -(-len(items) // settings.chunk_size))
    partial = os.path.join(out_dir, _PARTIAL)
    os.makedirs(partial, exist_ok=True)
    _check_settings(out_dir, settings, items_path, len(items), tokenizer=tokenizer, vq=vq, image_root=image_root)
    if os.path.exists(os.path.join(out_dir, "dataset_info.json")):  # its chunks' markers are gone: not redone
        log.info("%s is complete already (the same job): nothing to do", out_dir)
        return summary(out_dir)

    mine = [c for c in range(n_chunks) if c % process_count == process_index]
    todo = [c for c in mine if not os.path.exists(_marker(partial, c))]
    worker = _Chunk(tokenizer, vq, settings, image_root, items_path)
    bar = tqdm(total=sum(len(_chunk_items(items, c, settings.chunk_size)) for c in mine), unit="item",
               desc=f"pretokenize {settings.name} (process {process_index})", disable=not progress)
    bar.update(sum(len(_chunk_items(items, c, settings.chunk_size)) for c in mine if c not in todo))
    from array_record.python.array_record_module import ArrayRecordWriter

    for done, c in enumerate(todo):
        if max_chunks is not None and done >= max_chunks:
            break
        start = c * settings.chunk_size
        chunk = [(i, items[i]) for i in range(start, min(start + settings.chunk_size, len(items)))]
        records, kinds, sizes, bad = worker.run(chunk)
        tmp = _shard_path(partial, settings, c, n_chunks) + ".tmp"
        writer = ArrayRecordWriter(tmp, "group_size:1")
        for r in records:
            writer.write(r)
        writer.close()
        os.replace(tmp, _shard_path(partial, settings, c, n_chunks))
        # the marker last: the chunk is done
        _write_json(_marker(partial, c), {"written": len(records), "kinds": kinds, "sizes": sizes, "bad": bad})
        for b in bad:
            log.warning("skipped item %s (%s)", b["id"], b["reason"])
        bar.update(len(chunk))
    bar.close()
    return _maybe_finalize(out_dir, settings, n_chunks)


def _chunk_items(items, c, size):
    return items[c * size:(c + 1) * size]


def _marker(partial: str, c: int) -> str:
    return os.path.join(partial, f"chunk-{c:05d}.done.json")


def _shard_path(directory: str, settings: PretokenizeSettings, c: int, n: int) -> str:
    return os.path.join(directory, f"{settings.name}-{settings.split}.array_record-{c:05d}-of-{n:05d}")


def _own_name(path: str) -> str:
    """A temporary name for `path` of this process's own: the hosts of a pod write one file at once."""
    return f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"


def _write_json(path: str, obj) -> None:
    partial = _own_name(path)
    with open(partial, "w") as f:
        json.dump(obj, f)
    os.replace(partial, path)


def _create_once(path: str, obj) -> bool:
    """Writes `obj` as JSON to `path` only if no process has made `path` yet; True if this one did.
    The file appears whole (written under a name of this process's own, then hard-linked, which
    fails where the name exists): a host reading it never finds it empty, as it could between
    another's exclusive create and its write (and took an empty lock for a dead one's). Where the
    file system has no hard links (a bucket mounted with Cloud Storage FUSE), an exclusive create
    and then the write; `_read_settled` waits out that window."""
    partial = _own_name(path)
    with open(partial, "w") as f:
        json.dump(obj, f)
    try:
        os.link(partial, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.remove(partial)


_SETTLE_S = 60.0  # how long a file made by `_create_once` may be seen empty before it counts as abandoned


def _read_settled(path: str) -> dict | None:
    """The JSON object in a file `_create_once` made, waiting while it is empty or half written and
    younger than `_SETTLE_S` (its maker between its create and its write); None if it stays
    unreadable (its maker died there) or is gone."""
    while True:
        try:
            with open(path) as f:
                value = json.load(f)
            return value if isinstance(value, dict) else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            try:
                young = time.time() - os.path.getmtime(path) < _SETTLE_S
            except OSError:
                return None
            if not young:
                return None
            time.sleep(0.5)


def _fingerprints(tokenizer, vq) -> dict[str, str]:
    """sha256 of the text tokenizer (its whole tokenizer.json) and of the VQ-GAN (config and weights):
    a job resumed with another tokenizer or VQ-GAN wrote records of two kinds into one dataset."""
    return {key: part.fingerprint() for key, part in (("tokenizer_sha256", tokenizer), ("vqgan_sha256", vq))
            if hasattr(part, "fingerprint")}


def _check_settings(out_dir: str, settings: PretokenizeSettings, items_path: str, n_items: int, *,
                    tokenizer=None, vq=None, image_root: str | None = None) -> None:
    """A resumed run must be the same job; mixing settings in one dataset would corrupt it. The
    items file is fingerprinted by content: one edited between a kill and the restart (same path,
    same count) would otherwise resume into duplicated and lost records; so are the tokenizer and
    the VQ-GAN (a job.json written before they were has none, and is not held to them), and the
    folder the pictures are read from (a rerun with `--image-root` fixed after a first run that
    skipped every picture item reported that run's dataset as complete, or mixed both mid-way)."""
    path = os.path.join(out_dir, _PARTIAL, "job.json")
    digest = hashlib.sha256()
    with open(items_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    job = {"settings": settings.to_json(), "items": os.path.abspath(items_path), "num_items": n_items,
           "items_sha256": digest.hexdigest(), **_fingerprints(tokenizer, vq)}
    if image_root is not None:
        job["image_root"] = os.path.abspath(image_root)
    # made at once by the first host (hosts started together each found none and wrote their own:
    # with other settings, both passed and made one dataset of two kinds of records)
    if _create_once(path, job):
        return
    old = _read_settled(path)
    if old is None:
        raise ValueError(f"{path} cannot be read (empty or damaged: a run killed as it started?); delete it and rerun")
    digests = ("items_sha256", "tokenizer_sha256", "vqgan_sha256")
    if "image_root" not in old:  # (a job.json written before 2026-12-06 (night) has none)
        job.pop("image_root", None)
    same_job = {k: v for k, v in old.items() if k not in digests} == {k: v for k, v in job.items() if k not in digests}
    if same_job and old.get("items_sha256", job["items_sha256"]) != job["items_sha256"]:
        raise ValueError(f"{items_path} changed since the pre-tokenization in {out_dir} started (same path and "
                         "count, other content: resuming would duplicate some items and lose others); restore "
                         "the file, or use another directory")
    for key, what in (("tokenizer_sha256", "text tokenizer"), ("vqgan_sha256", "VQ-GAN")):
        if key in old and key in job and old[key] != job[key]:
            raise ValueError(f"{out_dir} holds a pre-tokenization started with another {what} (its records "
                             f"would be of two kinds in one dataset): give the {what} it was started with, or "
                             "use another directory")
    if not same_job:
        names = {"settings": "settings", "items": "items file", "num_items": "number of items",
                 "image_root": "picture folder (--image-root)"}
        differ = []
        for key, what in names.items():
            there, now = old.get(key), job.get(key)
            if there == now:
                continue
            if key == "settings" and isinstance(there, dict):  # the settings that differ, by name
                differ += [f"{k}: {there.get(k)!r} there, {now.get(k)!r} now" for k in sorted({*there, *now})
                           if there.get(k) != now.get(k)]
            else:
                differ.append(f"{what}: {there!r} there, {now!r} now")
        raise ValueError(f"{out_dir} holds a pre-tokenization started with other settings ("
                         f"{'; '.join(differ) or 'see its .partial/job.json'}): use the same ones, another "
                         "directory, or delete it")


def _take_finalize_lock(path: str) -> bool:
    """Only one process writes the metadata. The lock names its holder (host, pid); a lock whose
    holder on this host is gone (a finalize that crashed) is taken over, so a rerun finishes the job."""
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        if not _create_once(path, me):
            # empty: made by a process that died before it wrote its name, or an older version (a young
            # one is waited for: its maker may be writing its name now, on a file system without links)
            holder = _read_settled(path) or {}
            # a lock naming this very process is not held: a container restarted with the same host
            # name and pid (PID 1 in Kubernetes) would otherwise wait on itself forever
            alive = holder.get("host") == me["host"] and holder.get("pid") != me["pid"] and pid_alive(holder.get("pid"))
            other_host = holder.get("host") not in (None, me["host"])
            if alive or other_host:
                if other_host:
                    log.warning("%s is held by process %s on %s; if no process is finalizing there, delete it and "
                                "rerun", path, holder.get("pid"), holder.get("host"))
                return False
            log.warning("taking over %s from a finalize that did not finish (%s)", path, holder or "no holder named")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        return True
    return False


def _maybe_finalize(out_dir: str, settings: PretokenizeSettings, n_chunks: int) -> dict[str, Any]:
    partial = os.path.join(out_dir, _PARTIAL)
    markers = {c: _marker(partial, c) for c in range(n_chunks)}
    done = {c: p for c, p in markers.items() if os.path.exists(p)}
    if os.path.exists(os.path.join(out_dir, "dataset_info.json")):
        return summary(out_dir)
    if len(done) < n_chunks:
        return {"complete": False, "chunks_done": len(done), "chunks": n_chunks}
    lock = os.path.join(partial, "finalize.lock")
    if not _take_finalize_lock(lock):
        return {"complete": False, "chunks_done": len(done), "chunks": n_chunks, "finalizing": "another process"}
    try:
        _finalize(out_dir, settings, n_chunks, markers)
    except BaseException:
        os.remove(lock)  # a rerun finishes the job (a hard kill leaves a lock whose holder is gone: taken over)
        raise
    return summary(out_dir)


def _finalize(out_dir: str, settings: PretokenizeSettings, n_chunks: int, markers: dict[int, str]) -> None:
    partial = os.path.join(out_dir, _PARTIAL)

    import tensorflow_datasets as tfds

    lengths, bad, kinds, sizes = [], [], [], []
    for c in range(n_chunks):
        with open(markers[c]) as f:
            marker = json.load(f)
        lengths.append(marker["written"])
        kinds.extend(marker["kinds"])
        # (a chunk written before 2026-12-05 has no sizes: then the dataset has none, and the packing
        # bound reads records instead)
        if sizes is not None and "sizes" in marker:
            sizes.extend(marker["sizes"])
        else:
            sizes = None
        bad.extend(marker["bad"])
        moved = _shard_path(out_dir, settings, c, n_chunks)
        if not os.path.exists(moved):  # a finalize that died half-way moved some already
            os.replace(_shard_path(partial, settings, c, n_chunks), moved)
    with open(os.path.join(out_dir, BAD_ITEMS_FILE), "w") as f:
        for b in bad:
            f.write(json.dumps(b) + "\n")
    if not kinds:
        log.warning("%s: no item was written, all %d were skipped (%s says why): training cannot read it",
                    out_dir, len(bad), BAD_ITEMS_FILE)
    np.save(os.path.join(out_dir, KINDS_FILE), np.array(kinds, np.int8))
    if sizes is not None:
        np.save(os.path.join(out_dir, SIZES_FILE), np.array(sizes, np.int32).reshape(-1, 2))
    elif os.path.exists(os.path.join(out_dir, SIZES_FILE)):  # never another dataset's sizes beside these records
        os.remove(os.path.join(out_dir, SIZES_FILE))
    job = _read_settled(os.path.join(partial, "job.json")) or {}
    _write_json(os.path.join(out_dir, MADE_WITH_FILE), {k: job[k] for k in FINGERPRINTS if k in job})
    _write_json(os.path.join(out_dir, SETTINGS_FILE), settings.to_json())
    template = tfds.core.ShardedFileTemplate(data_dir=out_dir, template=_FILE_TEMPLATE, dataset_name=settings.name,
                                             split=settings.split, filetype_suffix="array_record")
    split = tfds.core.SplitInfo(name=settings.split, shard_lengths=lengths, num_bytes=0, filename_template=template)
    tfds.folder_dataset.write_metadata(data_dir=out_dir, features=features_dict(), split_infos=[split],
                                       filename_template=_FILE_TEMPLATE, check_data=False)
    for c in range(n_chunks):
        os.remove(markers[c])


def summary(out_dir: str) -> dict[str, Any]:
    """Items written and skipped by a finished pre-tokenization, and the items written of each kind
    (`kinds`: {"understanding": n, "generation": n}, an item that draws a picture being generation)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(out_dir)
    with open(os.path.join(out_dir, BAD_ITEMS_FILE)) as f:
        bad = [json.loads(line) for line in f]
    kinds = np.load(os.path.join(out_dir, KINDS_FILE)) if os.path.exists(os.path.join(out_dir, KINDS_FILE)) else None
    written = {} if kinds is None else {name: int(np.sum(kinds == k)) for k, name in enumerate(KINDS)}
    return {"complete": True, "written": builder.info.splits.total_num_examples, "skipped": len(bad),
            "bad_items": os.path.join(out_dir, BAD_ITEMS_FILE), "kinds": written}


def record_sizes(path: str) -> np.ndarray | None:
    """[records, 2]: every record's (tokens, image features), in order, of a finished pre-tokenized
    dataset; None for one written before its pre-tokenization recorded them (2026-12-05)."""
    sizes_path = os.path.join(path, SIZES_FILE)
    return np.load(sizes_path) if os.path.exists(sizes_path) else None


def made_with(path: str) -> dict[str, str]:
    """The fingerprints (`FINGERPRINTS`) of the text tokenizer and VQ-GAN a finished dataset was
    made with, as far as it recorded them: its `MADE_WITH_FILE`, or for one finished before
    2026-12-07 its pre-tokenization's job file; {} where neither holds any."""
    for where in (os.path.join(path, MADE_WITH_FILE), os.path.join(path, _PARTIAL, "job.json")):
        try:
            with open(where) as f:
                found = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(found, dict):
            return {k: v for k, v in found.items() if k in FINGERPRINTS and isinstance(v, str)}
    return {}


def open_dataset(path: str, split: str | None = None):
    """(random-access TFDS data source, PretokenizeSettings, kind of each record) of a finished
    pre-tokenized dataset."""
    import tensorflow_datasets as tfds

    settings_path = os.path.join(path, SETTINGS_FILE)
    if not os.path.exists(settings_path):
        hint = (" (it is still being written: a pre-tokenization has unfinished chunks)"
                if glob.glob(os.path.join(path, _PARTIAL, "*")) else
                f" (nothing there: a relative path is taken from the current directory, {os.getcwd()})"
                if not os.path.exists(path) and not os.path.isabs(path) else
                " (no such directory)" if not os.path.exists(path) else
                " (a file of items: pre-tokenize it first, `unitoken pretokenize`)" if os.path.isfile(path) else "")
        raise FileNotFoundError(f"{path} is not a finished pre-tokenized dataset{hint}")
    with open(settings_path) as f:
        settings = PretokenizeSettings.from_json(json.load(f))
    kinds = np.load(os.path.join(path, KINDS_FILE))
    if len(kinds) == 0:  # (array_record's "Paths sequence can not be of 0 length" otherwise, naming nothing)
        raise ValueError(f"{path} holds no records: pre-tokenization skipped every item (why, item by item: "
                         f"{os.path.join(path, BAD_ITEMS_FILE)}; a wrong --image-root skips every picture item)")
    builder = tfds.builder_from_directory(path)
    return builder.as_data_source(split=split or settings.split), settings, kinds
