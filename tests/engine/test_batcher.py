"""Micro-batches (engine/batcher.py): a ring's sessions cut into one batch per stage, and a forward that takes at
most one micro-batch, so the batches stay apart and every stage computes one of them at a time."""

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as Q

from duskpool.backends import load_span
from duskpool.engine.batcher import Batcher, BatchRecord, micro_batch, select
from duskpool.weights.gguf import GGUFFile


@dataclass
class Step:
    """What `select` reads of a job."""
    model: object
    cache: object
    rows: int = 1
    computed: int = 0


def test_micro_batch_is_one_batch_of_the_sessions_per_stage():
    assert [micro_batch(n, 4) for n in (0, 1, 4, 5, 16, 17, 64)] == [1, 1, 1, 2, 4, 5, 16]


def test_a_forward_takes_at_most_the_micro_batch_and_the_rest_keep_their_order():
    model = object()
    waiting = deque(Step(model, object()) for _ in range(5))
    taken, rest = select(waiting, 128, batch=2)
    assert taken == list(waiting)[:2] and list(rest) == list(waiting)[2:]
    taken, rest = select(waiting, 128)  # no micro-batch: every session waiting
    assert taken == list(waiting) and not rest


def test_busy_is_the_share_of_the_window_spent_in_forwards():
    batcher = Batcher()
    try:
        now = time.monotonic()
        batcher.recent.extend([BatchRecord(1, 1, 1.0, now - 4.0),  # wholly before the 2 s window
                               BatchRecord(1, 1, 1.0, now - 1.5),  # half in it
                               BatchRecord(4, 4, 0.25, now - 0.5)])
        assert abs(batcher.busy(2.0) - 0.375) < 0.01
        assert abs(batcher.busy(10.0) - 0.225) < 1e-9
    finally:
        batcher.close()


def test_sessions_decoding_at_once_go_through_in_micro_batches_with_their_own_logits(tiny_llama):
    model = load_span(GGUFFile(tiny_llama(Q.Q8_0)))
    sessions, steps = 8, 6
    alone = []
    for s in range(sessions):
        cache = model.new_cache(steps)
        alone.append([model.head(model.forward_span(model.embed([s + i]), cache, i))[0] for i in range(steps)])
    batcher = Batcher()
    got: list[list[torch.Tensor]] = [[] for _ in range(sessions)]

    def decode(s: int) -> None:
        cache = model.new_cache(steps)
        for i in range(steps):
            got[s].append(batcher.run(model, cache, i, model.embed([s + i]), logits=1, batch=2).output[0])

    threads = [threading.Thread(target=decode, args=(s,)) for s in range(sessions)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        batcher.close()
    sizes = [r.sessions for r in batcher.recent]
    assert max(sizes) == 2, f"a forward carried {max(sizes)} sessions; the micro-batch is 2"
    assert sum(sizes) == sessions * steps and sum(sizes) / len(sizes) > 1.5, f"the batches did not fill: {sizes}"
    for s in range(sessions):
        for i in range(steps):
            assert torch.allclose(got[s][i], alone[s][i], atol=1e-4), f"session {s} step {i} differs batched"


def test_a_step_waits_for_the_sessions_it_came_with_not_for_the_other_batches(tiny_llama, monkeypatch):
    """Four sessions live at a stage, micro-batch 4, a forward's wait made long (2 s). Two steps that the stage before
    computed together (group 2) go on as soon as both are here; without their group, they wait the whole window for
    the other two live sessions, which are in another batch and not on their way. Each computed step carries the
    sessions it was computed with on to the next stage."""
    monkeypatch.setattr("duskpool.engine.batcher.GATHER_MAX_S", 5.0)
    model = load_span(GGUFFile(tiny_llama(Q.Q8_0)))
    caches = [model.new_cache(8) for _ in range(4)]
    batcher = Batcher()

    def two_steps(position: int, group: int) -> tuple[float, list]:
        started, jobs = time.monotonic(), []
        threads = [threading.Thread(target=lambda c=c: jobs.append(
            batcher.run(model, c, position, model.embed([position + 1]), batch=4, group=group))) for c in caches[:2]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        return time.monotonic() - started, jobs

    try:
        for cache in caches:  # all four live here now
            batcher.run(model, cache, 0, model.embed([1]), batch=4)
        now = time.monotonic()
        batcher.recent.extend(BatchRecord(4, 4, 2.0, now) for _ in range(8))  # forwards "take" 2 s: the window
        waited, jobs = two_steps(1, group=2)
        assert waited < 1.0, f"two steps of a group of 2 waited {waited:.2f} s for sessions of another batch"
        assert [job.group for job in jobs] == [2, 2] and batcher.recent[-1].sessions == 2
        waited, _ = two_steps(2, group=0)
        assert waited > 1.5, f"without a group the steps should wait the window for the live sessions ({waited:.2f} s)"
    finally:
        batcher.close()
