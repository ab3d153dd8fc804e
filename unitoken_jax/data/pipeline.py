"""The Grain input pipeline: pre-tokenized datasets -> packed batches of static shape.

    sources (weights)  ->  one stream per kind (understanding / generation): each dataset's records
                           of that kind, shuffled per epoch (seeded), repeated, mixed by weight
                       ->  sharded by JAX process (every process reads its own part)
                       ->  records fetched and their images preprocessed for SigLIP (base or AnyRes)
                           in Grain's reader threads, or worker processes with `worker_count > 0`;
                           a record of the other split (below) is passed over before its images
                           are decoded
                       ->  groups of `mix` = (u, g) samples: u understanding + g generation
                       ->  packed whole into `rows` x `length` rows with segment ids; a batch takes
                           whole groups only, so every batch holds understanding : generation
                           samples exactly at the set ratio
                       ->  {tokens, labels, positions, segment_ids, is_continuous, feature_index,
                           pixels} arrays, plus `sample_ids` (the ids in each row) and `kinds`

A dataset's weight is its number of records of that kind times its `ratio`, so `ratio: 1.0` for
every dataset samples them as one concatenated dataset would (the reference's data config, whose
`ratio` subsamples a dataset). A sample longer than a row is dropped and counted (`dropped_too_long` in
TensorBoard, a warning in the training log), never cut.

Held-out split: with `holdout_fraction` f > 0, a sample is held out when a hash of its sample id
falls below f (`is_held_out`: the same answer on every host, in every run and on resume, and for
a sample that appears in two datasets under one id). The "train" split yields only the other
samples, the "eval" split only the held-out ones, so training never sees what evaluation
measures. f = 1 holds out everything (a dataset kept for evaluation alone).

The iterator's state (`get_state` / `set_state`, JSON-serialisable) restores the exact sample
order, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
from typing import Any, Sequence

import grain
import numpy as np
import yaml

from unitoken_jax.data import pretokenize as pt
from unitoken_jax.data.packing import FillBound, RowPacker, whole_sample_bound
from unitoken_jax.tokenizer import anyres as anyres_lib
from unitoken_jax.tokenizer import images as image_io
from unitoken_jax.tokenizer.conversation import EncodedConversation

KIND_NAMES = pt.KINDS
SPLITS = ("train", "eval")
_MAX_DROPS_IN_A_ROW = 1000

log = logging.getLogger(__name__)


def is_held_out(sample_id: str, fraction: float) -> bool:
    """Whether the sample `sample_id` belongs to the held-out part of size `fraction`: the first
    8 bytes of its BLAKE2b digest, read as a number in [0, 1), fall below `fraction`. (Python's
    `hash` of a string differs from process to process, so it cannot be used.)"""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(sample_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


@dataclasses.dataclass(frozen=True)
class Source:
    path: str  # a pre-tokenized dataset directory (`unitoken pretokenize`)
    ratio: float = 1.0  # weight = records x ratio

    def __post_init__(self):
        if not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio < math.inf):
            raise ValueError(f"{self.path}: ratio {self.ratio!r}; a weight is a finite number, 0 or more")


META_KEYS = ("path", "ratio", "type")  # the reference's; its `type` groups its length sampler's batches: unused here


def read_meta(path: str) -> list[Source]:
    """The reference's data config: YAML with `META: [{path: ..., ratio: ...}, ...]` (paths here
    are pre-tokenized dataset directories; a relative one is taken from the current directory, as
    the reference takes its paths; `type` is read and not used: the packing groups by kind)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data meta file (YAML with a 'META' list of {{path, ratio}})")
    try:
        with open(path, encoding="utf-8") as f:
            meta = yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    entries = meta.get("META") if isinstance(meta, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a 'META' list of {{path, ratio}} entries")
    sources = []
    for i, e in enumerate(entries):
        where = f"{path}: META entry {i}"
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) or not e["path"]:
            raise ValueError(f"{where} must be a mapping with a 'path' (a pre-tokenized dataset directory), "
                             f"got {e!r}")
        unknown = sorted(str(k) for k in e if k not in META_KEYS)
        if unknown:  # (a misspelt `ration: 0.1` was a ratio of 1, unsaid)
            raise ValueError(f"{where} ({e['path']}): unknown key(s) {', '.join(map(repr, unknown))}; an entry takes "
                             f"{', '.join(META_KEYS)}")
        ratio = e.get("ratio", 1.0)
        if isinstance(ratio, str):  # YAML reads `1e-3` (no '.') as a string
            with contextlib.suppress(ValueError):
                ratio = float(ratio)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < math.inf:
            raise ValueError(f"{where} ({e['path']}): ratio={ratio!r} must be a number of at least 0 (the share "
                             "of its records drawn; 0: none)")
        sources.append(Source(e["path"], float(ratio)))
    return sources


def _is_meta(path) -> bool:
    return isinstance(path, str) and path.endswith((".yaml", ".yml"))


def sources_from(spec) -> list[Source]:
    """A YAML meta path, or a list of paths (YAML meta files among them) / {path, ratio} dicts /
    Sources. (`--config.data.sources=meta.yaml` arrives as a one-element tuple.)"""
    if isinstance(spec, str):
        spec = [spec]
    out = []
    for s in spec:
        if isinstance(s, str) and "," in s and not os.path.exists(s):  # a command line's list, `a,b`
            out.extend(sources_from([part.strip() for part in s.split(",") if part.strip()]))
        elif isinstance(s, Source):
            out.append(s)
        elif _is_meta(s):
            out.extend(read_meta(s))
        elif isinstance(s, str):
            out.append(Source(s))
        else:
            out.append(Source(str(s["path"]), float(s.get("ratio", 1.0))))
    return out


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    rows: int  # rows of this process's part of the batch
    length: int
    mix: tuple[int, int] = (1, 1)  # understanding : generation samples per batch
    max_images: int = 8  # SigLIP tiles per batch (this process's part); more closes the batch
    blocks: int = 1  # equal blocks of rows and tiles; a row's pictures go in its block's tiles (RowPacker)
    seed: int = 0
    num_threads: int = 4
    prefetch: int = 16
    worker_count: int = 0  # > 0: preprocessing and packing in that many worker processes
    lookahead: int = 64  # later groups a batch may choose from besides the oldest waiting one (0: strictly in order)
    holdout_fraction: float = 0.0  # samples held out by sample id (`is_held_out`); 1: all of them
    split: str = "train"  # "train": the samples not held out; "eval": only the held-out ones

    def validate(self) -> "PipelineConfig":
        if self.blocks < 1 or self.rows % self.blocks or self.max_images % self.blocks:
            raise ValueError(f"blocks={self.blocks} must split rows={self.rows} and max_images={self.max_images} "
                             "evenly")
        if not 0.0 <= self.holdout_fraction <= 1.0:
            raise ValueError(f"holdout_fraction={self.holdout_fraction} must be in [0, 1]")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r}; choose one of {', '.join(SPLITS)}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a whole number of at least 0")
        if self.split == "eval" and self.holdout_fraction == 0:
            raise ValueError("split='eval' with holdout_fraction=0 holds out nothing: set a fraction of the sources "
                             "to hold out (1.0 for sources kept for evaluation alone)")
        return self

    def keeps(self, sample_id: str) -> bool:
        """Does this pipeline's split take the sample `sample_id`?"""
        return is_held_out(sample_id, self.holdout_fraction) == (self.split == "eval")


def _say_ratios_that_do_nothing(sources, kinds, mix) -> None:
    """Warns of a dataset the mix leaves out, and of a ratio that weighs a dataset against no other
    (ratios weigh the datasets of one kind against each other; the kinds' shares are `data.mix`):
    the README's own example once set a lone generation dataset's ratio to 0.5, to no effect."""
    for k in (0, 1):
        having = [(src, (ks == k).sum()) for src, ks in zip(sources, kinds) if (ks == k).any() and src.ratio > 0]
        if not mix[k]:
            unused = [src.path for src, ks in zip(sources, kinds) if src.ratio > 0 and (ks == k).all()]
            if unused:
                log.warning("data.mix %s takes no %s samples: %s, which hold%s only those, %s not trained on",
                            list(mix), KIND_NAMES[k], ", ".join(unused), "s" if len(unused) == 1 else "",
                            "is" if len(unused) == 1 else "are")
        elif len(having) == 1 and having[0][0].ratio != 1:
            log.warning("%s is the only dataset of %s samples: its ratio %g weighs it against no other (a ratio "
                        "weighs a kind's datasets against each other; data.mix %s sets the kinds' shares)",
                        having[0][0].path, KIND_NAMES[k], having[0][0].ratio, list(mix))


def _say_mix(sources, kinds, mix) -> None:
    """Logs where each kind's samples are drawn from: each dataset's expected share of its kind
    (its samples of the kind x its ratio, over the kind's total) and the kinds' shares (`mix`)."""
    parts = []
    for k in (0, 1):
        weights = [((ks == k).sum() * src.ratio, src.path) for src, ks in zip(sources, kinds) if src.ratio > 0]
        total = sum(w for w, _ in weights)
        if mix[k] and total:
            shares = ", ".join(f"{path} {100 * w / total:.1f}%" for w, path in weights if w)
            of = "every sample" if mix[k] == sum(mix) else f"{mix[k]} of every {sum(mix)} samples"
            parts.append(f"{KIND_NAMES[k]} ({of}): {shares}")
    log.info("data: %s", "; ".join(parts))


def order_changes(saved: dict | None, now: dict) -> list[str]:
    """What differs between two pipelines' `order` (a checkpoint's and this run's), in words; none
    for a checkpoint written before the order was recorded."""
    if saved is None:
        return []
    changes = [f"{name} {saved[key]} -> {now[key]}" for key, name in
               (("seed", "data.seed"), ("mix", "data.mix"), ("holdout_fraction", "eval.holdout_fraction"))
               if saved.get(key) != now[key]]
    before, after = saved.get("datasets", []), now["datasets"]
    if len(before) != len(after):
        changes.append(f"{len(before)} dataset(s), now {len(after)} ({', '.join(d['path'] for d in after)})")
    else:
        for i, (a, b) in enumerate(zip(before, after)):
            differ = [f"{key} {a.get(key)} -> {b[key]}" for key in ("understanding", "generation", "ratio")
                      if a.get(key) != b[key]]
            if differ:
                changes.append(f"dataset {i + 1} ({b['path']}): {', '.join(differ)}")
    return changes


@dataclasses.dataclass(frozen=True)
class OtherSplit:
    """What the record reader gives for a sample of the other split: its id, nothing decoded."""

    id: str


@dataclasses.dataclass
class Sample:
    id: str
    kind: int
    encoded: EncodedConversation
    pixels: np.ndarray  # [tiles, S, S, 3] float32
    num_features: int
    record: tuple[int, int]  # (dataset number, record index): which record, whatever its id (`_pick` compares them)


class _Records:
    """Picklable record reader for one kind: (dataset number, record index) -> Sample, or
    OtherSplit for a sample the `config`'s split does not take."""

    def __init__(self, paths: Sequence[str], config: PipelineConfig):
        self.paths = list(paths)
        self.config = config
        self._sources = None

    def __getstate__(self):
        return {"paths": self.paths, "config": self.config, "_sources": None}

    def _open(self):
        if self._sources is None:
            self._sources = [pt.open_dataset(p) for p in self.paths]
        return self._sources

    def __call__(self, ref) -> Sample:
        dataset, index = int(ref[0]), int(ref[1])
        source, settings, _ = self._open()[dataset]
        r = source[index]
        ident = r["id"].decode() if isinstance(r["id"], bytes) else str(r["id"])
        if not self.config.keeps(ident):
            return OtherSplit(ident)
        pixels, features = [], 0
        side = settings.siglip_size // settings.patch
        for raw in (r["image_bytes"] if settings.continuous else ()):
            picture = image_io.to_rgb(image_io.load_image(bytes(raw)))
            if settings.anyres:
                tiles = anyres_lib.anyres_image(picture, settings.siglip_size, settings.patch,
                                                settings.pinpoints()).pixels
            else:
                tiles = image_io.siglip_pixels(picture, settings.siglip_size)[None]
            pixels.append(tiles)
            features += len(tiles) * side * side
        if features != int(np.sum(r["num_features"])):
            raise ValueError(f"record {r['id']!r}: its images give {features} SigLIP features, the tokens expect "
                             f"{int(np.sum(r['num_features']))} (settings changed since pre-tokenization?)")
        size = settings.siglip_size
        stacked = np.concatenate(pixels) if pixels else np.zeros((0, size, size, 3), np.float32)
        enc = EncodedConversation(r["tokens"], r["labels"], r["is_continuous"], r["feature_index"], [], [])
        return Sample(ident, int(r["kind"]), enc, stacked, features, (dataset, index))


_MIX_WINDOW = 4096  # records of the mixed stream shuffled together (`_kind_stream`)


def _same_makers(sources: list[Source]) -> dict[str, str]:
    """The tokenizer and VQ-GAN fingerprints the datasets share (`pretokenize.made_with`); datasets
    made with different ones are refused, by name: the same token id or code would mean two things
    in one run. A dataset that recorded none is not held to them."""
    made = [pt.made_with(src.path) for src in sources]
    shared = {}
    for key, what in pt.FINGERPRINTS.items():
        found = {m[key] for m in made if key in m}
        if len(found) > 1:
            groups = [", ".join(src.path for src, m in zip(sources, made) if m.get(key) == f) for f in sorted(found)]
            raise ValueError(f"the datasets were pre-tokenized with different {what}s ({'; '.join(groups)}: one "
                             f"{what} each): one run trains on one; pre-tokenize them again with the same {what}")
        if found:
            shared[key] = found.pop()
    return shared


def _kind_stream(sources: list[Source], kinds_per_source, kind: int, seed: int):
    """Infinite MapDataset of (dataset number, record index) for `kind`, mixed by weight."""
    parts, weights = [], []
    for d, (source, kinds) in enumerate(zip(sources, kinds_per_source)):
        idx = np.flatnonzero(kinds == kind)
        if len(idx) == 0 or source.ratio <= 0:
            continue
        refs = np.stack([np.full(len(idx), d), idx], axis=1)
        # (one 32-bit seed for each dataset and kind from the user's: Grain takes seeds below 2**32)
        stream_seed = int(np.random.SeedSequence([seed, d, kind]).generate_state(1)[0])
        parts.append(grain.MapDataset.source(refs).shuffle(seed=stream_seed).repeat())
        weights.append(len(idx) * source.ratio)
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    # Grain mixes in a fixed repeating pattern (a, b, a, b, ... at 1 : 1), and the stream is then cut
    # [i::n] between a pod's processes and between worker processes: at 1 : 1 over 2 processes one
    # saw only dataset a, and with 2 workers whole batches alternated between the datasets. Shuffled
    # within windows (a one-to-one map of the indices: the same records, as often) each cut mixes by
    # weight. (A seed below 2**31: Grain adds the window's number to it.)
    mixed = grain.MapDataset.mix(parts, weights)
    window_seed = int(np.random.SeedSequence([seed, kind, len(parts)]).generate_state(1)[0]) >> 1
    return grain.experimental.WindowShuffleMapDataset(mixed, window_size=_MIX_WINDOW, seed=window_seed)


class InputPipeline(grain.IterDataset):
    """`iter(pipeline)` gives packed batches; see the module docstring."""

    def __init__(self, sources, config: PipelineConfig, *, process_index: int = 0, process_count: int = 1):
        self.sources = sources_from(sources)
        self.config = config.validate()
        opened = [pt.open_dataset(s.path) for s in self.sources]
        settings = {(o[1].siglip_size, o[1].patch) for o in opened}
        if len(settings) > 1:
            raise ValueError(f"the datasets were pre-tokenized for different SigLIP inputs {sorted(settings)}; "
                             "one batch needs one tile size")
        self.siglip_size, self.patch = settings.pop()
        self.made_with = _same_makers(self.sources)
        self.image_settings: pt.PretokenizeSettings = opened[0][1]  # how the (first) dataset laid out its pictures
        for name, how in (("anyres", lambda v: "AnyRes tiles" if v else "one tile a picture"),
                          ("continuous", lambda v: "codes and SigLIP features" if v else "codes only")):
            kinds_of = [getattr(s, name) for _, s, *_ in opened]
            if len(set(kinds_of)) > 1:  # (the order of data.sources had decided inference's layout, unsaid)
                log.warning("the datasets lay out their pictures differently (%s): the model learns both, and the "
                            "trained model records the first's, %s, as inference's default (put the layout it should "
                            "answer with first in data.sources)",
                            "; ".join(f"{src.path}: {how(v)}" for src, v in zip(self.sources, kinds_of)),
                            how(kinds_of[0]))
        crops = {s.vq_size for _, s, *_ in opened}
        if len(crops) > 1:
            log.warning("the datasets cut their pictures for the VQ-GAN at %s px (%s): the trained model records "
                        "the first's, %d px, as inference's default crop", " and ".join(map(str, sorted(crops))),
                        ", ".join(f"{src.path}: {s.vq_size}" for src, (_, s, *_) in zip(self.sources, opened)),
                        opened[0][1].vq_size)
        for source, (_, s, *_) in zip(self.sources, opened):
            if s.max_length is None or s.max_length > config.length:  # (None: pre-tokenized with no maximum)
                sizes = pt.record_sizes(source.path)
                if sizes is not None:  # what the data holds (it had said the pre-tokenizer's limit: 4096)
                    over = int((sizes[:, 0] > config.length).sum())
                    if over:
                        log.warning("%d of the %d samples of %s are longer than a row (up to %d positions, rows are "
                                    "%d: data.length): they are dropped and counted (dropped_too_long in "
                                    "TensorBoard, a warning in the training log)", over, len(sizes), source.path,
                                    int(sizes[:, 0].max()), config.length)
                    continue
                log.warning("%s holds samples of up to %s positions, rows are %d (data.length): longer samples are "
                            "dropped and counted (dropped_too_long in TensorBoard, a warning in the training log)",
                            source.path, "any number of" if s.max_length is None else s.max_length, config.length)
        kinds = [o[2] for o in opened]
        self._kinds = kinds
        # what the sample order follows from (a resume compares it with the checkpoint's: read
        # positions of another order train some samples twice and skip others); paths only to name them
        self.order = {"datasets": [{"path": src.path, "understanding": int((ks == 0).sum()),
                                    "generation": int((ks == 1).sum()), "ratio": float(src.ratio)}
                                   for src, ks in zip(self.sources, kinds)],
                      "mix": [int(m) for m in config.mix], "seed": int(config.seed),
                      "holdout_fraction": float(config.holdout_fraction)}
        self.counts = {KIND_NAMES[k]: int(sum((ks == k).sum() for ks in kinds)) for k in (0, 1)}
        if process_index == 0 and config.split == "train":
            _say_ratios_that_do_nothing(self.sources, kinds, config.mix)
            _say_mix(self.sources, kinds, config.mix)
        streams = []
        for k in (0, 1):
            if config.mix[k] == 0:
                streams.append(None)
                continue
            s = _kind_stream(self.sources, kinds, k, config.seed)
            if s is None:
                weighted = self.counts[KIND_NAMES[k]] and all(src.ratio <= 0 for src, ks in zip(self.sources, kinds)
                                                              if (ks == k).any())
                only = tuple(int(j != k) for j in (0, 1))  # (the other kind alone)
                raise ValueError(f"mix {config.mix} asks for {KIND_NAMES[k]} samples but "
                                 + ("every dataset that has them has ratio 0" if weighted else "no dataset has any")
                                 + f" (counts: {self.counts}); to train on {KIND_NAMES[1 - k]} samples alone, "
                                 f"set data.mix to {only} (--config.data.mix=\"({only[0]},{only[1]})\")")
            s = s[process_index::process_count].map(_Records([src.path for src in self.sources], config))
            streams.append(s.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                                               prefetch_buffer_size=config.prefetch)))
        super().__init__([s for s in streams if s is not None])
        self._streams = streams
        # the groups a batch chooses among: the oldest waiting and `lookahead` more, but at most half
        # an epoch of this process's share of the scarcer kind (in this split): a small dataset's
        # window would hold a record from two epochs at once, which `_pick` then keeps waiting
        share = config.holdout_fraction if config.split == "eval" else 1.0 - config.holdout_fraction
        drawn = [int(sum((ks == k).sum() for ks, src in zip(kinds, self.sources) if src.ratio > 0)) for k in (0, 1)]
        epochs = [int(drawn[k] * share) // (config.mix[k] * process_count) for k in (0, 1) if config.mix[k]]
        self.window = max(1, min(config.lookahead + 1, min(epochs) // 2))

    @property
    def features_per_tile(self) -> int:
        return (self.siglip_size // self.patch) ** 2

    def fill_bound(self, records: int = 1000) -> tuple[FillBound, int]:
        """How full whole samples can keep this pipeline's batches over a long run
        (`packing.whole_sample_bound`), and from how many records. A dataset whose pre-tokenization
        recorded every record's size (`pretokenize.record_sizes`) gives them all, reading no record;
        from one written before, about `records` records of each kind in all are read, shared among
        such datasets by their numbers of that kind (at least one each) and spread evenly over each."""
        c = self.config
        lengths, tiles = ([], []), ([], [])
        drawn = [(source, ks) for source, ks in zip(self.sources, self._kinds) if source.ratio > 0]
        sizes = [pt.record_sizes(source.path) for source, _ in drawn]
        totals = [sum(int((ks == k).sum()) for (_, ks), sz in zip(drawn, sizes) if sz is None) for k in (0, 1)]
        per_tile = self.features_per_tile  # (every dataset's: one batch has one tile size)
        for (source, ks), sz in zip(drawn, sizes):
            if sz is not None:
                for k in (0, 1):
                    lengths[k].extend(sz[ks == k, 0].tolist())
                    tiles[k].extend((sz[ks == k, 1] / per_tile).tolist())
                continue
            data, _, _ = pt.open_dataset(source.path)
            for k in (0, 1):
                idx = np.flatnonzero(ks == k)
                share = min(len(idx), max(1, round(records * len(idx) / max(totals[k], 1))))
                for i in idx[np.linspace(0, len(idx) - 1, share).astype(int)]:  # (none where share is 0)
                    r = data[int(i)]
                    lengths[k].append(len(r["tokens"]))
                    tiles[k].append(int(np.sum(r["num_features"])) / per_tile)
        # samples longer than a row are dropped, not packed: the bound is of those that are
        fit = [[i for i, n in enumerate(lengths[k]) if n <= c.length] for k in (0, 1)]
        dropped = sum(len(lengths[k]) - len(fit[k]) for k in (0, 1) if c.mix[k])
        if dropped:
            log.info("%d of the %d records sized are longer than a row (%d positions) and are dropped: the packing "
                     "bound is of the others", dropped, sum(len(lengths[k]) for k in (0, 1) if c.mix[k]), c.length)
        lengths = tuple([lengths[k][i] for i in fit[k]] for k in (0, 1))
        tiles = tuple([tiles[k][i] for i in fit[k]] for k in (0, 1))
        bound = whole_sample_bound(lengths, tiles, c.mix, c.rows, c.length, c.max_images)
        return bound, sum(len(lengths[k]) for k in (0, 1) if c.mix[k])

    def __iter__(self):
        return _PackingIterator(self, [p.__iter__() for p in self.parents])

    def iterator(self) -> grain.DatasetIterator:
        """The batch iterator, run in `worker_count` worker processes when that is > 0."""
        if self.config.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside an absl app, use defaults
                flags.FLAGS.mark_as_parsed()
            return self.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.config.worker_count)).__iter__()
        return self.__iter__()


def dropped_too_long(iterator) -> int:
    """The samples `iterator` (an `InputPipeline.iterator()`) dropped for being longer than a row,
    as its state counts them (up to the oldest group read but not yet packed: what a resume goes
    on from), the same whether it packs here or in worker processes (summed over theirs)."""

    def total(state) -> int:
        if isinstance(state, dict):
            return sum(int(v) if k == "dropped_too_long" else total(v) for k, v in state.items())
        return sum(total(v) for v in state) if isinstance(state, (list, tuple)) else 0

    return total(iterator.get_state())


class _PackingIterator(grain.DatasetIterator):
    """Packs groups into batches, choosing among the oldest waiting group and up to
    `config.lookahead` later ones (`InputPipeline.window` in all): every batch starts with the
    oldest, so no group waits more batches than the window holds groups; after it, the oldest goes
    in when it strands no further room (leaves no new row with less room than the shortest sample
    in the window); otherwise the group that strands the least room goes in, the longest on ties.
    A batch closes when none of them fits.

    State: the streams' state before the oldest group read but not yet packed (the anchor), and
    which of the groups read after it were packed already (`packed_ahead`, numbered from the
    anchor). Restoring re-reads the streams from the anchor and skips those groups, so a resumed
    run packs exactly the same batches."""

    def __init__(self, pipeline: InputPipeline, parents):
        super().__init__(parents)
        self.p = pipeline
        self.config = pipeline.config
        self._iters = []
        j = 0
        for s in pipeline._streams:
            self._iters.append(None if s is None else parents[j])
            j += s is not None
        self.dropped_too_long = 0
        self.packed = 0
        self._read = 0  # groups read since the anchor (restore skips `_skip` among the re-read ones)
        self._skip: set[int] = set()
        self._waiting: list[tuple[int, dict, list[Sample]]] = []  # (number, state before reading, group)
        self._ahead: set[int] = set()  # numbers of groups packed while an older one waits

    def _streams_now(self) -> dict[str, Any]:
        return {"streams": [None if i is None else i.get_state() for i in self._iters],
                "dropped_too_long": self.dropped_too_long}

    def _next_group(self) -> list[Sample]:
        group = []
        for k, it in enumerate(self._iters):
            for _ in range(self.config.mix[k]):
                group.append(self._next_sample(k, it))
        return group

    def _next_sample(self, kind: int, it) -> Sample:
        """The next sample of `kind` that is of this pipeline's split and fits a row."""
        too_long = other_split = 0
        # a stream with no sample of the split at all would repeat forever: give up after going
        # round all its records many times (one held-out sample in it is met about once a round)
        max_other = max(_MAX_DROPS_IN_A_ROW, 10 * self.p.counts[KIND_NAMES[kind]])
        while True:
            s = next(it)
            if isinstance(s, OtherSplit):
                other_split += 1
                if other_split >= max_other:
                    c = self.config
                    raise ValueError(f"no {KIND_NAMES[kind]} sample is in the {c.split!r} split: {other_split} in a "
                                     f"row were not (holdout_fraction={c.holdout_fraction} of "
                                     f"{self.p.counts[KIND_NAMES[kind]]} samples); change the fraction, or give "
                                     "held-out datasets of their own")
                continue
            if len(s.encoded) <= self.config.length:
                return s
            self.dropped_too_long += 1
            too_long += 1
            if too_long >= _MAX_DROPS_IN_A_ROW:
                raise ValueError(f"{_MAX_DROPS_IN_A_ROW} {KIND_NAMES[kind]} samples in a row are longer than a row "
                                 f"({self.config.length} positions); raise data.length")

    def _read_group(self) -> None:
        """Reads the next group not packed before a restore into the waiting list."""
        while True:
            state, number = self._streams_now(), self._read
            group = self._next_group()
            self._read += 1
            if number in self._skip:  # packed before the restore: still packed ahead of the anchor, until it
                self._skip.discard(number)  # passes (a state saved now must skip it again)
                self._ahead.add(number)
                continue
            self._waiting.append((number, state, group))
            return

    def __next__(self) -> dict[str, Any]:
        c = self.config
        packer = RowPacker(c.rows, c.length, c.max_images * self.p.features_per_tile, c.blocks)
        samples: list[Sample] = []
        while True:
            while len(self._waiting) < self.p.window:
                self._read_group()
            pick, rows = self._pick(packer, {s.record for s in samples})
            if pick is None:
                if packer.empty:
                    group = self._waiting[0][2]
                    raise ValueError(f"a group of {len(group)} samples ({[len(s.encoded) for s in group]} tokens, "
                                     f"{sum(s.num_features for s in group) // self.p.features_per_tile} image "
                                     f"tiles) does not fit an empty batch of {c.rows} x {c.length} with "
                                     f"{c.max_images} image tiles{self._blocks_note()}; raise rows, length or "
                                     "max_images")
                break
            number, _, group = self._waiting.pop(pick)
            packer.add(self._pairs(group), list(range(len(samples), len(samples) + len(group))), rows)
            samples.extend(group)
            self.packed += len(group)
            if pick:
                self._ahead.add(number)
        oldest = self._waiting[0][0] if self._waiting else self._read
        self._ahead = {n for n in self._ahead if n > oldest}
        return self._batch(packer, samples)

    @staticmethod
    def _pairs(group: list[Sample]) -> list[tuple[Any, int]]:
        return [(s.encoded, s.num_features) for s in group]

    def _pick(self, packer: RowPacker, packed: set[tuple[int, int]]) -> tuple[int | None, list[int] | None]:
        """Which waiting group goes in next (an index into `_waiting`) and its samples' rows, or
        (None, None) when none in the window fits (see the class's doc). A later group holding a
        record the batch has (`packed`) waits: a window reaching into the next epoch (reshuffled) or
        a dataset drawn many times its size can hold one record twice. The oldest does not: a batch
        of more samples than an epoch holds repeats in any order."""
        window = self._waiting[:self.p.window]
        if packer.empty:  # every batch starts with the oldest: no group waits longer than the window
            rows = packer.place(self._pairs(window[0][2]))
            return (None, None) if rows is None else (0, rows)
        shortest = min(len(s.encoded) for _, _, group in window for s in group)
        before = packer.stranded(shortest)
        best, best_rows = None, None
        for i, (_, _, group) in enumerate(window):
            if i and any(s.record in packed for s in group):  # (the oldest goes in: a batch longer than an
                continue  # epoch holds records twice, as it must; the window's reach must not add more)
            pairs = self._pairs(group)
            rows = packer.place(pairs)
            if rows is None:
                continue
            left = packer.stranded(shortest, pairs, rows)
            if i == 0 and left == before:
                return 0, rows
            key = (left, -sum(len(s.encoded) for s in group), i)
            if best is None or key < best:
                best, best_rows = key, rows
        return (None, None) if best is None else (best[2], best_rows)

    def _blocks_note(self) -> str:
        c = self.config
        if c.blocks == 1:
            return ""
        return (f", {c.max_images // c.blocks} for each block of {c.rows // c.blocks} rows (the rows and tiles are "
                "split over the data-parallel shards, and a row's pictures must be in its own block's tiles)")

    def _batch(self, packer: RowPacker, samples: list[Sample]) -> dict[str, Any]:
        b = packer.finish()
        size = self.p.siglip_size
        pixels = np.zeros((self.config.max_images, size, size, 3), np.float32)
        for number, _, first in b.image_slots:
            tile = first // self.p.features_per_tile
            pixels[tile:tile + len(samples[number].pixels)] = samples[number].pixels
        return {"tokens": b.tokens, "labels": b.labels, "positions": b.positions, "segment_ids": b.segment_ids,
                "is_continuous": b.is_continuous, "feature_index": b.feature_index, "pixels": pixels,
                "sample_ids": [[samples[i].id for i in row] for row in b.sample_ids],
                "kinds": [KIND_NAMES[s.kind] for s in samples]}

    def get_state(self) -> dict[str, Any]:
        if self._waiting:  # anchored at the oldest waiting group
            first, state, _ = self._waiting[0]
        else:  # anchored here: the next group read is number `_read`
            first, state = self._read, self._streams_now()
        ahead = sorted(n - first for n in self._ahead | self._skip if n >= first)
        return {**state, "packed": self.packed, "packed_ahead": ahead}

    def set_state(self, state: dict[str, Any]) -> None:
        for it, s in zip(self._iters, state["streams"]):
            if it is not None:
                it.set_state(s)
        self.dropped_too_long = state["dropped_too_long"]
        self.packed = state["packed"]
        self._read = 0
        self._skip = set(state.get("packed_ahead", ()))
        self._waiting, self._ahead = [], set()
