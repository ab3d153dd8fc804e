"""Packing encoded samples into fixed-length rows (host side, before the device sees them).

Samples are placed whole, in order, each into the fullest row that still has room for it (best
fit; the first such row on ties); a sample is never split, and one longer than a row is dropped and
counted. Each row carries `segment_ids` (1, 2, ... per sample, 0 for padding), `positions`
restarting at 0 for every sample, and `feature_index` pointing into the batch's flat list of
image features, where `image_slots` says each sample's features start.

With `blocks` = S > 1 (the training input pipeline: S data-parallel shards), the rows and the
feature capacity are split into S equal consecutive blocks, and a sample in a row of block k has
its features in block k: each chip then finds its rows' features among its own share of the
pixels (see `UniToken.embed`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import numpy as np

from unitoken_jax.tokenizer.conversation import EncodedConversation


@dataclasses.dataclass
class PackedBatch:
    tokens: np.ndarray  # int32 [B, L]
    labels: np.ndarray  # int32 [B, L], -100 where not predicted
    segment_ids: np.ndarray  # int32 [B, L]
    positions: np.ndarray  # int32 [B, L]
    is_continuous: np.ndarray  # bool [B, L]
    feature_index: np.ndarray  # int32 [B, L]
    image_slots: list[tuple[int, int, int]]  # (sample number, its features, where they start) per sample with images
    sample_ids: list[list[int]]  # which stream samples each row holds


@dataclasses.dataclass
class PackingStats:
    packed: int = 0
    dropped_too_long: int = 0


class RowPacker:
    """Fills one batch of `rows` x `length`: whole samples, best fit, at most `max_features` image
    features in all (the batch's pixel capacity), split into `blocks` equal blocks of rows and of
    features (see the module's doc). Add groups of samples that go in together or not at all
    (`place`, or `fits`, then `add`), then `finish`."""

    def __init__(self, rows: int, length: int, max_features: int | None = None, blocks: int = 1):
        if blocks < 1 or rows % blocks or (max_features is not None and max_features % blocks):
            raise ValueError(f"{blocks} blocks must split the {rows} rows and the {max_features} image features "
                             "evenly")
        if blocks > 1 and max_features is None:
            raise ValueError("blocks > 1 split a feature capacity: give max_features")
        self.rows, self.length, self.blocks = rows, length, blocks
        self.rows_per_block = rows // blocks
        self.block_capacity = None if max_features is None else max_features // blocks
        z = lambda dtype: np.zeros((rows, length), dtype)  # noqa: E731
        self.arrays = dict(tokens=z(np.int32), labels=np.full((rows, length), -100, np.int32),
                           segment_ids=z(np.int32), positions=z(np.int32), is_continuous=z(bool),
                           feature_index=z(np.int32))
        self.fill = [0] * rows
        self.block_features = [0] * blocks
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.slots: list[tuple[int, int, int]] = []

    @property
    def empty(self) -> bool:
        return not any(self.ids)

    def place(self, samples) -> list[int] | None:
        """The row of each sample (best fit: the fullest row with room whose block has room for its
        features), or None when the group does not go in whole. With blocks, a group that does not
        go in in its own order is tried again with its most-featured samples first (2 blocks of 4
        tiles take a group of 2, 1, 3 and 2 tiles only so)."""
        placed = self._best_fit(samples, range(len(samples)))
        if placed is None and self.blocks > 1 and len(samples) > 1:
            placed = self._best_fit(samples, sorted(range(len(samples)), key=lambda i: -samples[i][1]))
        return placed

    def _best_fit(self, samples, order) -> list[int] | None:
        fill, used = list(self.fill), list(self.block_features)
        placed = [0] * len(samples)
        for i in order:
            sample, n_features = samples[i]
            row, most = None, -1
            for r in range(self.rows):
                if most < fill[r] <= self.length - len(sample) and (
                        self.block_capacity is None
                        or used[r // self.rows_per_block] + n_features <= self.block_capacity):
                    row, most = r, fill[r]
            if row is None:
                return None
            placed[i] = row
            fill[row] += len(sample)
            used[row // self.rows_per_block] += n_features
        return placed

    def fits(self, samples: list[tuple[EncodedConversation, int]]) -> bool:
        return self.place(samples) is not None

    def stranded(self, shorter_than: int, samples=(), rows=()) -> int:
        """Positions left in rows whose room is under `shorter_than` (no sample that long fits
        there), now or once `samples` went into `rows` (as `place` gives them)."""
        fill = list(self.fill)
        for (sample, _), row in zip(samples, rows):
            fill[row] += len(sample)
        return sum(self.length - f for f in fill if 0 < self.length - f < shorter_than)

    def add(self, samples: list[tuple[EncodedConversation, int]], numbers: list[int],
            rows: list[int] | None = None) -> None:
        """Places `samples` (checked with `fits`) in `rows` (default: `place`'s); `numbers` name them
        in `sample_ids` and `image_slots`."""
        rows = self.place(samples) if rows is None else rows
        assert rows is not None, "add() a group that does not fit"
        a = self.arrays
        for (sample, n_features), row, number in zip(samples, rows, numbers):
            start, end = self.fill[row], self.fill[row] + len(sample)
            block = row // self.rows_per_block
            first = block * (self.block_capacity or 0) + self.block_features[block]
            a["tokens"][row, start:end] = sample.tokens
            a["labels"][row, start:end] = sample.labels
            a["segment_ids"][row, start:end] = len(self.ids[row]) + 1
            a["positions"][row, start:end] = np.arange(len(sample))
            a["is_continuous"][row, start:end] = sample.is_continuous
            a["feature_index"][row, start:end] = np.where(sample.is_continuous, sample.feature_index + first, 0)
            if n_features:
                self.slots.append((number, n_features, first))
            self.block_features[block] += n_features
            self.fill[row] = end
            self.ids[row].append(number)

    def finish(self) -> PackedBatch:
        return PackedBatch(**self.arrays, image_slots=list(self.slots), sample_ids=[list(r) for r in self.ids])


@dataclasses.dataclass(frozen=True)
class FillBound:
    per_row: int  # the most samples a row can hold (as many of the shortest as fit)
    mean: float  # the mean sample length, the kinds weighted as drawn
    shortest: int
    next_length: int | None  # the row length that holds one more of the shortest samples (None: all fit one)
    by_rows: float  # per_row x mean / length: what the rows' length allows
    by_tiles: float  # what the batch's tiles allow (inf: no tile budget, or no pictures)
    tiles_each: float  # picture tiles a sample, the kinds weighted as drawn

    @property
    def bound(self) -> float:
        """The largest share of a batch's positions whole samples can fill over a long run."""
        return min(1.0, self.by_rows, self.by_tiles)


def whole_sample_bound(lengths: Sequence[Sequence[int]], tiles: Sequence[Sequence[float]], mix: Sequence[int],
                       rows: int, length: int, max_tiles: int | None = None) -> FillBound:
    """How full whole samples can keep batches over a long run, for samples of each kind k with
    `lengths[k]` positions and `tiles[k]` picture tiles, drawn `mix[k]` at a time, in batches of
    `rows` x `length` with at most `max_tiles` tiles.

    A row holds at most n samples, n being how many of the shortest fit in it; over a long run
    every sample is drawn in turn, so rows are at most n x the mixed mean length full, and a batch
    at most (the samples its tiles allow) x that mean. No choice of which samples go together
    passes it for long (a few batches can, by taking the longer samples first); more would need
    samples split across rows."""
    kinds = [k for k, m in enumerate(mix) if m and len(lengths[k])]
    if not kinds:
        raise ValueError(f"no samples of the kinds mix {tuple(mix)} draws")
    total = sum(mix[k] for k in kinds)
    mean = sum(mix[k] * float(np.mean(lengths[k])) for k in kinds) / total
    tiles_each = sum(mix[k] * float(np.mean(tiles[k])) for k in kinds) / total
    ordered = np.cumsum(np.sort(np.concatenate([np.asarray(lengths[k]) for k in kinds])))
    per_row = int(np.searchsorted(ordered, length, side="right"))
    by_rows = per_row * mean / length
    by_tiles = max_tiles / tiles_each * mean / (rows * length) if max_tiles is not None and tiles_each > 0 else np.inf
    next_length = int(ordered[per_row]) if per_row < len(ordered) else None
    return FillBound(per_row, mean, int(ordered[0]), next_length, float(by_rows), float(by_tiles), tiles_each)


def pack(samples: Iterable[tuple[EncodedConversation, int]], rows: int, length: int,
         stats: PackingStats | None = None) -> Iterator[PackedBatch]:
    """`samples`: (encoded sample, number of image features it uses). Yields batches of `rows`
    rows; the last, partial batch is yielded too (padding rows are all zeros)."""
    stats = stats if stats is not None else PackingStats()
    packer = RowPacker(rows, length)
    for number, (sample, n_features) in enumerate(samples):
        if len(sample) > length:
            stats.dropped_too_long += 1
            continue
        group = [(sample, n_features)]
        if not packer.fits(group):
            yield packer.finish()
            packer = RowPacker(rows, length)
        packer.add(group, [number])
        stats.packed += 1
    if not packer.empty:
        yield packer.finish()
