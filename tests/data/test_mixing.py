"""MixedBatchSampler: the replay share of every batch, the epochs, and the shares ranks get."""

import pytest
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from workbench.data.mixing import MixedBatchSampler, replay_per_batch


def batches(sampler):
    return [list(b) for b in BatchSampler(sampler, sampler.batch_size, drop_last=False)]


def replay_in(batch, n_task):
    return [i for i in batch if i >= n_task]


def test_rule_is_round_of_ratio_times_batch():
    assert [replay_per_batch(r, 8) for r in (0.1, 0.2, 0.25, 0.3, 0.5)] == [1, 2, 2, 2, 4]


@pytest.mark.parametrize("n_task,pool,batch_size,per_batch", [(50, 16, 8, 2), (7, 3, 4, 1), (30, 100, 10, 3)])
def test_every_batch_is_full_and_holds_exactly_per_batch_replay(n_task, pool, batch_size, per_batch):
    sampler = MixedBatchSampler(n_task, pool, batch_size, per_batch, seed=1)
    got = batches(sampler)
    assert len(got) * batch_size == len(sampler) and all(len(b) == batch_size for b in got)
    assert all(len(replay_in(b, n_task)) == per_batch for b in got)
    task = [i for b in got for i in b if i < n_task]
    assert set(task) == set(range(n_task))  # every task example once an epoch, a few twice to fill the last
    assert len(task) - n_task < batch_size - per_batch
    assert all(n_task <= i < n_task + pool for b in got for i in replay_in(b, n_task))


def test_epochs_reshuffle_and_read_on_through_the_pool():
    sampler = MixedBatchSampler(48, 32, 8, 2, seed=0)  # 8 batches: 16 replay an epoch, half the pool
    first = batches(sampler)
    assert batches(sampler) == first  # the same epoch is the same order (a resumed run skips into it)
    sampler.set_epoch(1)
    second = batches(sampler)
    assert second != first
    seen = [i for b in first + second for i in replay_in(b, 48)]
    assert sorted(seen) == list(range(48, 80))  # two epochs: the whole pool, each sample once


def test_two_ranks_get_different_shares_that_cover_the_pool():
    """accelerate's own per-rank sharding (what `accelerate launch` wraps the Trainer's loader in)."""
    n_task, pool = 48, 16  # 8 batches of 6 task + 2 replay: one pass over the pool an epoch
    sampler = MixedBatchSampler(n_task, pool, 8, 2, seed=3)
    shares = []
    for rank in range(2):
        shard = BatchSamplerShard(BatchSampler(sampler, 8, drop_last=False), num_processes=2, process_index=rank)
        rank_batches = list(shard)
        assert len(rank_batches) == 4 and all(len(replay_in(b, n_task)) == 2 for b in rank_batches)
        shares.append({i for b in rank_batches for i in replay_in(b, n_task)})
    assert len(shares[0]) == len(shares[1]) == 8
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(n_task, n_task + pool))


def test_refuses_a_share_that_leaves_no_room():
    with pytest.raises(ValueError, match="between 1 and"):
        MixedBatchSampler(10, 4, 8, 8)
    with pytest.raises(ValueError, match="between 1 and"):
        MixedBatchSampler(10, 4, 8, 0)
