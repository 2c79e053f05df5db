"""The data order does not depend on the number of processes: with the same micro-batch and the same
micro-batches per optimizer step (processes × accumulation), 2 processes and 1 process accumulating 2
train on the same micro-batches in the same steps, and a checkpoint's data position written on one
continues exactly on the other (both ways)."""

from __future__ import annotations

import pytest

from toolkit.data.buckets import BucketBatchSampler
from toolkit.data.sampler import ResumableLoader, ResumableSampler
from toolkit.run.processes import rescale_batch_progress

N, MICRO, PER_STEP = 23, 2, 2   # micro-batch 2, 2 micro-batches per step: 2 × 1 or 1 × 2


class Keys:
    """A dataset whose items are the sampler's keys ``(epoch, index)``."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return key


def loaders(world: int, buckets: bool) -> list[ResumableLoader]:
    accum = PER_STEP // world
    bucket_of = [i % 3 for i in range(N)]
    out = []
    for r in range(world):
        order = (BucketBatchSampler(bucket_of, MICRO, 5, True, r, world, accum) if buckets
                 else ResumableSampler(N, MICRO, 5, True, r, world, accum))
        out.append(ResumableLoader(Keys(), order, collate_fn=list))
    return out


def steps(ls: list[ResumableLoader], epochs: int = 2, stop: int | None = None) -> list[tuple[tuple[int, ...], ...]]:
    """Each optimizer step's micro-batches, in their order in the step (accumulation slot × process)."""
    out = []
    for epoch in range(epochs):
        for ld in ls:
            ld._order.set_epoch(epoch)
        out += rest(ls, None if stop is None else stop - len(out))
        if stop is not None and len(out) == stop:
            break
    return out


def rest(ls: list[ResumableLoader], stop: int | None = None) -> list[tuple[tuple[int, ...], ...]]:
    """The steps the loaders still yield in their current epoch."""
    accum = PER_STEP // len(ls)
    its, out = [iter(ld) for ld in ls], []
    while stop is None or len(out) < stop:
        try:
            slots = [[tuple(i for _, i in next(it)) for it in its] for _ in range(accum)]
        except StopIteration:
            break
        out.append(tuple(mb for slot in slots for mb in slot))
    return out


@pytest.mark.parametrize("buckets", [False, True])
def test_two_processes_and_one_accumulating_two_train_on_the_same_micro_batches(buckets):
    one, two = steps(loaders(1, buckets)), steps(loaders(2, buckets))
    assert one == two and len(one) >= 2 * (N // (MICRO * PER_STEP)) - 2
    assert all(len(s) == PER_STEP for s in one)
    seen = [i for s in one[: len(one) // 2] for mb in s for i in mb]
    assert len(seen) == len(set(seen))   # an epoch holds an item once
    if buckets:   # one bucket per step
        assert all(len({i % 3 for mb in s for i in mb}) == 1 for s in one)


@pytest.mark.parametrize("buckets", [False, True])
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_data_position_saved_on_w_processes_continues_exactly_on_another_w(buckets, before, after):
    whole = steps(loaders(1, buckets), epochs=1)
    first = loaders(before, buckets)
    done = steps(first, epochs=1, stop=3)
    states = [ld.state_dict() for ld in first]
    assert len({(s["epoch"], s["batches"]) for s in states}) == 1
    resumed = loaders(after, buckets)
    for ld in resumed:
        ld.load_state_dict(states[0])
    assert done + rest(resumed) == whole


def test_a_resume_that_changes_the_micro_batch_or_the_step_is_refused():
    state = loaders(2, False)[0].state_dict()
    other = ResumableLoader(Keys(), ResumableSampler(N, MICRO * 2, 5, True, 0, 1, 1))   # 1 × 4: another sum
    with pytest.raises(ValueError, match=r"micro-batches of 2 images, 2 per optimizer step \(2 processes × "
                                         r"accumulation 1\); this run has 4 images, 1 per step"):
        other.load_state_dict(state)


def test_lightning_loop_counts_follow_the_processes():
    """Per-process batch counts scale by W/W' (each counter keeps its offset from ``ready``); the
    optimizer-step counts do not move."""
    def ckpt(world: int, ready: int) -> dict:
        counts = {"ready": ready, "started": ready, "processed": ready, "completed": ready - 1}
        return {"loops": {"fit_loop": {"state_dict": {"combined_loader": [{"world_size": world}]},
                                       "epoch_loop.batch_progress": {"total": dict(counts), "current": dict(counts),
                                                                     "is_last_batch": False}}}}
    c = ckpt(2, 3)
    assert rescale_batch_progress(c, 1)
    assert c["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"] == \
        {"ready": 6, "started": 6, "processed": 6, "completed": 5}
    c = ckpt(1, 6)
    assert rescale_batch_progress(c, 2) and c["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["ready"] == 3
    assert not rescale_batch_progress(ckpt(2, 3), 2)
    with pytest.raises(ValueError, match="not at an optimizer step"):
        rescale_batch_progress(ckpt(1, 3), 2)
