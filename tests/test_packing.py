"""Packing: whole samples only, segment ids and positions per sample, feature indices per batch,
too-long samples dropped and counted. (That a packed row computes what the separate samples
compute is tested on the model: tests/test_unitoken_parity.py.)"""

import numpy as np

from unitoken_jax.data.packing import PackingStats, pack
from unitoken_jax.tokenizer.conversation import EncodedConversation


def _sample(n, n_cont=0, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(8900, 8960, n).astype(np.int32)
    cont = np.zeros(n, bool)
    cont[1:1 + n_cont] = True
    index = np.where(cont, np.cumsum(cont) - 1, 0).astype(np.int32)
    labels = np.where(cont, -100, tokens).astype(np.int32)
    return EncodedConversation(np.where(cont, 0, tokens), labels, cont, index, [], [])


def test_samples_are_packed_whole_in_order_with_segments_and_positions():
    samples = [(_sample(5, 2, 0), 2), (_sample(4, 0, 1), 0), (_sample(7, 3, 2), 3), (_sample(12, 0, 3), 0),
               (_sample(3, 1, 4), 1)]
    stats = PackingStats()
    batches = list(pack(samples, rows=2, length=10, stats=stats))
    assert stats.packed == 4 and stats.dropped_too_long == 1  # the 12-token sample cannot fit a row
    first = batches[0]
    assert first.sample_ids == [[0, 1], [2, 4]]
    assert first.segment_ids[0].tolist() == [1] * 5 + [2] * 4 + [0]
    assert first.positions[0].tolist() == list(range(5)) + list(range(4)) + [0]
    assert first.segment_ids[1].tolist() == [1] * 7 + [2] * 3
    # features: sample 0 -> rows 0..1, sample 2 -> 2..4, sample 4 -> 5
    assert first.feature_index[first.is_continuous].tolist() == [0, 1, 2, 3, 4, 5]
    assert first.image_slots == [(0, 2), (2, 3), (4, 1)]
    np.testing.assert_array_equal(first.tokens[0, :5], samples[0][0].tokens)
    assert (first.labels[first.segment_ids == 0] == -100).all()


def test_a_full_batch_starts_a_new_one():
    samples = [(_sample(6, 0, i), 0) for i in range(5)]
    batches = list(pack(samples, rows=2, length=10))
    assert [b.sample_ids for b in batches] == [[[0], [1]], [[2], [3]], [[4], []]]
    assert batches[-1].segment_ids[1].sum() == 0  # a padding row
