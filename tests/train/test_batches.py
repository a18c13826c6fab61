"""BatchOrder: the training order is a pure function of (seed, step), split across ranks."""
import numpy as np
import pytest

from marginface.train.batches import BatchOrder, InMemoryBatches


def test_each_epoch_visits_distinct_images_and_drops_the_partial_batch():
    order = BatchOrder(num_images=50, batch_size=8, seed=1, flip=False)
    assert order.steps_per_epoch == 6  # 50 // 8: the last 2 images wait for the next epoch
    for epoch in range(3):
        seen = np.concatenate([order.step(epoch * 6 + k)[0] for k in range(6)])
        assert len(seen) == 48 and len(np.unique(seen)) == 48
        assert seen.min() >= 0 and seen.max() < 50
    first, second = (np.concatenate([order.step(e * 6 + k)[0] for k in range(6)]) for e in (0, 1))
    assert not np.array_equal(first, second), "each epoch must reshuffle"


def test_resume_from_any_step_gives_the_same_batches_and_flips():
    walked = BatchOrder(100, 10, seed=7)
    batches = [walked.step(s) for s in range(25)]
    fresh = BatchOrder(100, 10, seed=7)  # a resumed run builds a new order and jumps to its step
    for s in (24, 3, 17, 0):
        idx, flips = fresh.step(s)
        np.testing.assert_array_equal(idx, batches[s][0])
        np.testing.assert_array_equal(flips, batches[s][1])
    other_seed = BatchOrder(100, 10, seed=8)
    assert not np.array_equal(other_seed.step(0)[0], batches[0][0])


def test_ranks_split_the_single_process_global_batch():
    single = BatchOrder(96, 16, seed=3)
    ranks = [BatchOrder(96, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in (0, 5, 11):
        idx, flips = single.step(step)
        np.testing.assert_array_equal(np.concatenate([r.step(step)[0] for r in ranks]), idx)
        np.testing.assert_array_equal(np.concatenate([r.step(step)[1] for r in ranks]), flips)


def test_p_by_k_batches_hold_k_images_of_each_of_p_identities():
    labels = np.repeat(np.arange(12), 5)  # 12 identities x 5 images
    order = BatchOrder(len(labels), 12, seed=0, labels=labels, samples_per_identity=4)
    for step in range(5):
        ids, counts = np.unique(labels[order.step(step)[0]], return_counts=True)
        assert len(ids) == 3 and set(counts) == {4}


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_images=10, batch_size=16, seed=0), "fewer than one global batch"),
    (dict(num_images=60, batch_size=10, seed=0, labels=np.repeat(np.arange(12), 5), samples_per_identity=4),
     "divisible"),
    (dict(num_images=60, batch_size=40, seed=0, labels=np.repeat(np.arange(6), 10), samples_per_identity=4),
     "identities are fewer"),
])
def test_impossible_orders_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchOrder(**kwargs)


def test_in_memory_batches_gather_labels_and_apply_the_flips():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 4, 6, 3), dtype=np.uint8)
    labels = np.arange(20)
    order = BatchOrder(20, 5, seed=2)
    it = InMemoryBatches(images, labels, order).iterate(start_step=3)
    batch, got_labels = next(it)
    idx, flips = order.step(3)
    np.testing.assert_array_equal(got_labels.numpy(), labels[idx])
    expected = images[idx].transpose(0, 3, 1, 2).copy()
    expected[flips] = expected[flips][..., ::-1]
    np.testing.assert_array_equal(batch.numpy(), expected)
    assert batch.dtype.is_floating_point is False
