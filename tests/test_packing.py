"""Packing: whole samples only, segment ids and positions per sample, feature indices per batch,
too-long samples dropped and counted. (That a packed row computes what the separate samples
compute is tested on the model: tests/test_unitoken_parity.py.)"""

import numpy as np
import pytest

from unitoken_jax.data.packing import PackingStats, RowPacker, pack, whole_sample_bound
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
    assert first.image_slots == [(0, 2, 0), (2, 3, 2), (4, 1, 5)]
    np.testing.assert_array_equal(first.tokens[0, :5], samples[0][0].tokens)
    assert (first.labels[first.segment_ids == 0] == -100).all()


def test_a_full_batch_starts_a_new_one():
    samples = [(_sample(6, 0, i), 0) for i in range(5)]
    batches = list(pack(samples, rows=2, length=10))
    assert [b.sample_ids for b in batches] == [[[0], [1]], [[2], [3]], [[4], []]]
    assert batches[-1].segment_ids[1].sum() == 0  # a padding row


def test_blocks_keep_each_rows_features_in_its_own_block():
    """With blocks, a row of block k takes features only from block k's share of the capacity (the
    training step gathers each data-parallel shard's features from its own pixels); a sample that
    its block has no room for goes to a row of the next block with room, never over a block's
    share."""
    packer = RowPacker(rows=4, length=10, max_features=8, blocks=2)  # blocks: rows 0-1 / 2-3, features 0-3 / 4-7
    samples = [_sample(4, 3, 0), _sample(4, 2, 1), _sample(3, 1, 2), _sample(3, 2, 3), _sample(2, 0, 4)]
    for number, sample in enumerate(samples):
        n = int(sample.is_continuous.sum())
        assert packer.fits([(sample, n)])
        packer.add([(sample, n)], [number])
    batch = packer.finish()
    # 0 (3 features) -> row 0, block 0 has 1 left; 1 (2) -> row 2; 2 (1) -> row 0; 3 (2) -> row 2;
    # 4 (none) -> row 0's last two positions
    assert batch.sample_ids == [[0, 2, 4], [], [1, 3], []]
    assert batch.image_slots == [(0, 3, 0), (1, 2, 4), (2, 1, 3), (3, 2, 6)]
    for row in range(4):
        used = batch.feature_index[row][batch.is_continuous[row]]
        block = row // 2
        assert ((used >= 4 * block) & (used < 4 * (block + 1))).all()
    # every feature of the capacity is used once
    assert sorted(batch.feature_index[batch.is_continuous].tolist()) == list(range(8))
    # both blocks are full of features now: a picture fits nowhere, text still does
    assert not packer.fits([(_sample(2, 1, 5), 1)])
    assert packer.fits([(_sample(2, 0, 6), 0)])


def test_blocks_must_split_the_rows_and_the_features():
    for rows, features, blocks in ((4, 8, 3), (4, 6, 4), (4, None, 2), (4, 8, 0)):
        with pytest.raises(ValueError, match="blocks|max_features"):
            RowPacker(rows=rows, length=10, max_features=features, blocks=blocks)


def test_a_group_that_fits_the_blocks_only_in_another_order_goes_in():
    """2 blocks of 4 features: a group of 2, 1, 3 and 2 fits only as {2, 2} and {1, 3}, which first
    fit in the group's own order misses (2 and 1 in block 0, 3 in block 1, no room for the last 2)."""
    packer = RowPacker(rows=2, length=40, max_features=8, blocks=2)
    group = [(_sample(6, n, seed=n), n) for n in (2, 1, 3, 2)]
    assert packer.fits(group)
    packer.add(group, [0, 1, 2, 3])
    batch = packer.finish()
    for row in range(2):
        used = batch.feature_index[row][batch.is_continuous[row]]
        assert len(used) == 4 and ((used >= 4 * row) & (used < 4 * (row + 1))).all()
    assert sorted(batch.feature_index[batch.is_continuous].tolist()) == list(range(8))
    assert sorted(n for _, n, _ in batch.image_slots) == [1, 2, 2, 3]


def test_a_sample_goes_to_the_fullest_row_with_room():
    """Best fit: 6 and 7 open two rows of 10; the 3 goes where it fills a row (the 7), which leaves
    the 4 room to go in. First fit would put the 3 after the 6 and strand the 4."""
    packer = RowPacker(rows=2, length=10)
    for number, n in enumerate((6, 7, 3, 4)):
        group = [(_sample(n, 0, number), 0)]
        assert packer.fits(group), n
        packer.add(group, [number])
    assert packer.finish().sample_ids == [[0, 3], [1, 2]]


def test_stranded_counts_the_room_no_sample_of_that_length_can_use():
    packer = RowPacker(rows=3, length=10)
    for number, n in enumerate((6, 7)):
        packer.add([(_sample(n, 0, number), 0)], [number])
    # rooms 4, 3 and 10: under 4 only the 3 is stranded; under 5 the 4 too
    assert packer.stranded(4) == 3 and packer.stranded(5) == 7

    def after(group, shorter_than):
        rows = packer.place(group)
        return None if rows is None else packer.stranded(shorter_than, group, rows)

    assert after([(_sample(3, 0, 9), 0)], 4) == 0  # the 3 fills the 7's row
    assert after([(_sample(2, 0, 9), 0)], 4) == 1  # after the 7: rooms 4, 1, 10
    assert after([(_sample(2, 0, 9), 0)], 5) == 4 + 1
    # the 5 takes the empty row, then nothing has room for the 6
    assert after([(_sample(5, 0, 9), 0), (_sample(6, 0, 8), 0)], 4) is None
    assert packer.fill == [6, 7, 0]  # asking placed nothing


def test_the_whole_sample_bound_is_the_samples_a_row_holds_times_the_mean():
    # lengths 3, 4, 4, 5 (understanding) and 6, 6 (generation), drawn 1 : 1: mean (4 + 6) / 2 = 5;
    # the shortest three (3 + 4 + 4 = 11) fit a row of 12, four (16) do not: 3 x 5 / 12 = 1.25 -> 1
    bound = whole_sample_bound([[3, 4, 4, 5], [6, 6]], [[1, 1, 1, 1], [0, 0]], (1, 1), rows=2, length=12)
    assert (bound.bound, bound.per_row, bound.mean, bound.shortest, bound.next_length) == (1.0, 3, 5.0, 3, 16)
    # rows of 20 hold 4 of the shortest (3 + 4 + 4 + 5 = 16; a fifth makes 22): 4 x 5 / 20 = 1.0; of 21: 4 x 5 / 21
    assert whole_sample_bound([[3, 4, 4, 5], [6, 6]], [[0] * 4, [0] * 2], (1, 1), rows=2, length=21).bound == 20 / 21
    # 2 tiles a batch, half a tile a sample on average: 4 samples of mean 5 in 2 x 21 positions
    tiles = whole_sample_bound([[3, 4, 4, 5], [6, 6]], [[1] * 4, [0] * 2], (1, 1), rows=2, length=21, max_tiles=2)
    assert (tiles.bound, tiles.by_tiles, tiles.by_rows, tiles.tiles_each) == (4 * 5 / 42, 4 * 5 / 42, 20 / 21, 0.5)
    assert whole_sample_bound([[3, 4], [6]], [[1, 1], [0]], (1, 1), rows=2, length=21).by_tiles == np.inf
    # generation only (mix 0 : 1): two 6s fit a row of 12, mean 6: 1.0; of 13: 12 / 13
    assert whole_sample_bound([[3, 4, 4, 5], [6, 6]], [[0] * 4, [0] * 2], (0, 1), rows=1, length=13).bound == 12 / 13
    with pytest.raises(ValueError, match="no samples"):
        whole_sample_bound([[], [6]], [[], [0]], (1, 0), rows=1, length=10)
