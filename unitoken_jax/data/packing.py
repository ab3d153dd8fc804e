"""Packing encoded samples into fixed-length rows (host side, before the device sees them).

Samples are placed whole, in order, into the first row with room (first fit over the rows still
open in the current batch); a sample is never split, and one longer than a row is dropped and
counted. Each row carries `segment_ids` (1, 2, ... per sample, 0 for padding), `positions`
restarting at 0 for every sample, and `feature_index` pointing into the batch's flat list of
image features, in the order the batch's images are listed in `image_slots`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

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
    image_slots: list[tuple[int, int]]  # (sample number in the stream, its image-feature block) per block
    sample_ids: list[list[int]]  # which stream samples each row holds


@dataclasses.dataclass
class PackingStats:
    packed: int = 0
    dropped_too_long: int = 0


def pack(samples: Iterable[tuple[EncodedConversation, int]], rows: int, length: int,
         stats: PackingStats | None = None) -> Iterator[PackedBatch]:
    """`samples`: (encoded sample, number of image features it uses). Yields batches of `rows`
    rows; the last, partial batch is yielded too (padding rows are all zeros)."""
    stats = stats if stats is not None else PackingStats()

    def empty():
        z = lambda dtype: np.zeros((rows, length), dtype)  # noqa: E731
        return dict(tokens=z(np.int32), labels=np.full((rows, length), -100, np.int32), segment_ids=z(np.int32),
                    positions=z(np.int32), is_continuous=z(bool), feature_index=z(np.int32)), [0] * rows, \
            [[] for _ in range(rows)], []

    arrays, fill, ids, slots = empty()
    features = 0
    for number, (sample, n_features) in enumerate(samples):
        n = len(sample)
        if n > length:
            stats.dropped_too_long += 1
            continue
        row = next((r for r in range(rows) if fill[r] + n <= length), None)
        if row is None:
            yield _finish(arrays, slots, ids)
            arrays, fill, ids, slots = empty()
            features, row = 0, 0
        start, end = fill[row], fill[row] + n
        arrays["tokens"][row, start:end] = sample.tokens
        arrays["labels"][row, start:end] = sample.labels
        arrays["segment_ids"][row, start:end] = len(ids[row]) + 1
        arrays["positions"][row, start:end] = np.arange(n)
        arrays["is_continuous"][row, start:end] = sample.is_continuous
        arrays["feature_index"][row, start:end] = np.where(sample.is_continuous, sample.feature_index + features, 0)
        if n_features:
            slots.append((number, n_features))
        features += n_features
        fill[row] = end
        ids[row].append(number)
        stats.packed += 1
    if any(ids):
        yield _finish(arrays, slots, ids)


def _finish(arrays, slots, ids) -> PackedBatch:
    return PackedBatch(**arrays, image_slots=list(slots), sample_ids=[list(r) for r in ids])
