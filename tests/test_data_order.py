"""The data order does not depend on the number of processes: with the same global batch, 1 and W
processes train on the same images in the same steps, and a checkpoint's data position written on
2 processes continues exactly on 1 (and back)."""

from __future__ import annotations

import pytest

from toolkit.data.buckets import BucketBatchSampler
from toolkit.data.sampler import ResumableLoader, ResumableSampler

N, GLOBAL = 23, 4


class Keys:
    """A dataset whose items are the sampler's keys ``(epoch, index)``."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return key


def loaders(world: int, buckets: bool) -> list[ResumableLoader]:
    per = GLOBAL // world
    bucket_of = [i % 3 for i in range(N)]
    out = []
    for r in range(world):
        if buckets:
            out.append(ResumableLoader(Keys(), batch_sampler=BucketBatchSampler(bucket_of, per, 5, True, r,
                                                                                       world), collate_fn=list))
        else:
            out.append(ResumableLoader(Keys(), ResumableSampler(N, 5, True, r, world), per, collate_fn=list))
    return out


def global_steps(ls: list[ResumableLoader], epochs: int = 2, stop: int | None = None) -> list[frozenset]:
    """What each loader step trains on, summed over ranks (stop: after that many steps)."""
    steps = []
    for epoch in range(epochs):
        set_epoch(ls, epoch)
        for batches in zip(*ls, strict=True):
            steps.append(frozenset(i for b in batches for _, i in b))
            if stop is not None and len(steps) == stop:
                return steps
    return steps


def set_epoch(ls: list[ResumableLoader], epoch: int) -> None:
    for s in ls:
        s._order.set_epoch(epoch)


@pytest.mark.parametrize("buckets", [False, True])
def test_one_and_two_processes_train_on_the_same_images_in_the_same_steps(buckets):
    one, two = global_steps(loaders(1, buckets)), global_steps(loaders(2, buckets))
    assert one == two and len(one) >= 2 * (N // GLOBAL)
    assert all(len(s) >= 2 for s in two)
    if buckets:   # one bucket per step
        assert all(len({i % 3 for i in s}) == 1 for s in one)


@pytest.mark.parametrize("buckets", [False, True])
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_data_position_saved_on_w_processes_continues_exactly_on_another_w(buckets, before, after):
    whole = global_steps(loaders(1, buckets), epochs=1)
    first = loaders(before, buckets)
    done = global_steps(first, epochs=1, stop=3)
    states = [ld.state_dict() for ld in first]
    assert len({(s["epoch"], s["batches"]) for s in states}) == 1
    resumed = loaders(after, buckets)
    for ld in resumed:
        ld.load_state_dict(states[0])
    rest = [frozenset(i for b in batches for _, i in b) for batches in zip(*resumed, strict=True)]
    assert done + rest == whole


def test_a_resume_that_changes_the_global_batch_is_refused():
    state = loaders(2, False)[0].state_dict()
    other = ResumableLoader(Keys(), ResumableSampler(N, 5, True, 0, 1), GLOBAL // 2)
    with pytest.raises(ValueError, match=r"saved on 2 processes with a per-device batch of 2 \(4 images.*1 × 2 = 2"):
        other.load_state_dict(state)
