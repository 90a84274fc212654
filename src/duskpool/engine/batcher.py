"""Continuous batching at one stage: the steps of every session waiting there run as one forward.

A node hands each arriving step to its `Batcher`; the gateway hands it its prefix and suffix steps. One
worker thread takes everything waiting for one span: every decode step, and the prompts being prefilled
up to `prefill_rows` rows between them (a long prompt goes through in chunks, so the others' tokens keep
coming), and computes them as one `forward_batch` (models/base.py `Batch`: rows concatenated through the
projections, attention per session over its own KV). Sessions join and leave between forwards.

A job that asks for logits gets those of its last `logits` rows, through one `head` call for the batch.

Micro-batches: where a route's stages compute at once (each on a machine, or cores, of its own), one batch of
every session would leave all stages but one idle. The gateway cuts its sessions into one micro-batch per stage
(`micro_batch`) and each job carries that size: a forward gathers up to it and takes no more, so the batches stay
apart and travel the ring one behind the other, every stage computing one of them. Each step also carries its
`group`: how many sessions the stage before computed it with, and so sent on at the same moment. The next stage
waits for exactly those, so a batch that lost a session on the way (one that ended, or came late to the gateway)
goes on at once instead of waiting a forward's time for a session that is not coming.
"""

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from duskpool.models import KVCache, SpanModel
from duskpool.models.base import Segment

PREFILL_ROWS = 128  # prompt rows per forward, beside the decode steps: a long prompt never stalls the others
LIVE_S = 1.0  # a session that sent a step this recently is expected back
GATHER_MAX_S = 0.05  # the longest a forward waits for the live sessions still on their way
Done = Callable[["Job", Exception | None], None]  # (the job, computed: its `output` and `group`; or the error)


@dataclass
class Job:
    model: SpanModel
    cache: KVCache
    start: int  # position of hidden's first row
    hidden: Any  # [T, dim]
    done: Done
    logits: int = 0  # > 0: the logits [logits, vocab] of the last rows are the output, not the hidden state
    batch: int = 0  # the micro-batch: sessions per forward at most, and gathered up to (0: every live session)
    # the sessions this step travels with: on arrival, those the stage before computed it with, all on their way
    # here (0: not known); once computed, those it was computed with here, which leave together
    group: int = 0
    computed: int = 0  # rows through so far (a prompt goes through in chunks)
    outputs: list = field(default_factory=list)
    output: Any = None  # once computed: its hidden state, or its logits
    failed: bool = False

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]


@dataclass(frozen=True)
class BatchRecord:
    """One forward: how many sessions and rows it carried, how long it took and when it ended (time.monotonic)."""
    sessions: int
    rows: int
    seconds: float
    ended: float = 0.0


class Batcher:
    """One worker thread computing the jobs submitted to it, batched per span. `lock`: held around every
    forward (a node's compute lock, which its speed probe shares)."""

    def __init__(self, name: str = "batcher", prefill_rows: int = PREFILL_ROWS, lock: Any = None,
                 on_batch: Callable[[SpanModel, BatchRecord], None] | None = None):
        self.prefill_rows, self.lock = prefill_rows, lock or threading.Lock()
        self.on_batch = on_batch
        self._waiting: deque[Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.recent: deque[BatchRecord] = deque(maxlen=1024)
        self._seen: dict[int, tuple[float, int]] = {}  # id(cache) -> when its session last sent a step, id(model)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        job.model.ops.evaluate(job.hidden)  # built on the caller's thread: computed there (Ops.evaluate)
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._waiting.append(job)
            self._seen[id(job.cache)] = time.monotonic(), id(job.model)
            self._ready.notify()

    def run(self, model: SpanModel, cache: KVCache, start: int, hidden: Any, logits: int = 0, batch: int = 0,
            group: int = 0) -> Job:
        """Submit and wait: the job computed, its `output` the output of hidden [T, dim] at positions start.. (or its
        last rows' logits)."""
        future: Future = Future()
        self.submit(Job(model, cache, start, hidden, _settle(future), logits, batch, group))
        return future.result()

    def forget(self, cache: KVCache) -> None:
        """The session of `cache` has ended: no forward waits for it any more."""
        with self._ready:
            self._seen.pop(id(cache), None)

    def mean_sessions(self, last: int = 64) -> float:
        """Sessions per forward, over the last `last` forwards (0 before any)."""
        recent = list(self.recent)[-last:]
        return sum(r.sessions for r in recent) / len(recent) if recent else 0.0

    def busy(self, window_s: float = 2.0) -> float:
        """The fraction of the last `window_s` seconds spent in forwards: near 1, this stage is what the route waits
        for; well below 1 at many sessions, the route is bound by its hops, not by compute."""
        since = time.monotonic() - window_s
        return min(1.0, sum(r.seconds - max(0.0, since - (r.ended - r.seconds)) for r in list(self.recent)
                            if r.ended > since) / window_s)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()

    # --- the worker ---------------------------------------------------------------------------------
    def _take(self) -> list[Job]:
        """The jobs of the next forward: the span of the oldest waiting job, each session once, every decode
        step, and prompt rows up to the budget. Jobs not taken keep their place."""
        with self._ready:
            while not self._waiting and not self._closed:
                self._ready.wait()
            if self._closed:
                return []
            self._gather()
            taken, self._waiting = select(self._waiting, self.prefill_rows, self._waiting[0].batch)
            return taken

    def _gather(self) -> None:
        """Under the lock: wait a little (about one forward, at most GATHER_MAX_S) for the sessions on their way to
        the oldest waiting step's span, until its `batch` of them wait (0: all): the `group` it came with, or where
        that is not known, the sessions that were here within LIVE_S and are not waiting yet. Sessions then travel
        the route in batches of that size instead of spreading into many smaller ones."""
        now, oldest = time.monotonic(), self._waiting[0]
        model = oldest.model
        self._seen = {c: (t, m) for c, (t, m) in self._seen.items() if now - t < LIVE_S}
        coming = oldest.group or sum(m == id(model) for _, m in self._seen.values())
        wanted = min(oldest.batch, coming) if oldest.batch else coming
        recent = [r.seconds for r in islice(reversed(self.recent), 8)]  # not a copy of all 1024, every forward
        window = min(GATHER_MAX_S, sorted(recent)[len(recent) // 2]) if recent else 0.0
        deadline = now + window
        while True:
            waiting = len({id(job.cache) for job in self._waiting if job.model is model})
            left = deadline - time.monotonic()
            if waiting >= wanted or left <= 0 or self._closed:
                return
            self._ready.wait(left)

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                return
            chunks = chunk_rows(jobs, self.prefill_rows)
            try:
                self._forward(jobs, chunks)
            except Exception as e:  # noqa: BLE001 - one session's bad step must not fail the others'
                if len(jobs) == 1:
                    self._finish(jobs[0], error=e)
                else:  # each alone, so that only the bad one fails
                    for job, n in zip(jobs, chunks, strict=True):
                        try:
                            self._forward([job], [n])
                        except Exception as alone:  # noqa: BLE001
                            self._finish(job, error=alone)
            waiting_again = [job for job in jobs if job.computed < job.rows and not job.failed]
            if waiting_again:
                with self._ready:
                    self._waiting.extendleft(reversed(waiting_again))  # a prompt's next chunk keeps its place

    def _forward(self, jobs: list[Job], chunks: list[int]) -> None:
        model = jobs[0].model
        segments = [Segment(job.cache, job.start + job.computed, n) for job, n in zip(jobs, chunks, strict=True)]
        parts = [job.hidden[job.computed:job.computed + n] for job, n in zip(jobs, chunks, strict=True)]
        started = time.perf_counter()
        with self.lock:
            ops = model.ops
            hidden = parts[0] if len(parts) == 1 else ops.concat(parts)
            out = model.forward_batch(hidden, segments)
            outputs = [out] if len(jobs) == 1 else _split(out, chunks)
            finished = []
            for job, n, output in zip(jobs, chunks, outputs, strict=True):
                job.outputs.append(output)
                job.computed += n
                if job.computed == job.rows:
                    finished.append(job)
            heads = [j for j in finished if j.logits]
            if heads:  # the batch's logits in one head call
                tails = [_tail(ops, j, j.logits) for j in heads]
                logits = model.head(tails[0] if len(tails) == 1 else ops.concat(tails))
                for job, rows in zip(heads, _split(logits, [t.shape[0] for t in tails]), strict=True):
                    job.outputs = [rows]
        record = BatchRecord(len(jobs), sum(chunks), time.perf_counter() - started, time.monotonic())
        self.recent.append(record)
        if self.on_batch is not None:
            self.on_batch(model, record)
        for job in finished:
            job.output = job.outputs[0] if len(job.outputs) == 1 else model.ops.concat(job.outputs)
            job.group = len(finished)
            model.ops.evaluate(job.output)  # before it leaves this thread
            self._finish(job)

    def _finish(self, job: Job, error: Exception | None = None) -> None:
        job.failed = error is not None
        try:
            job.done(job, error)
        except Exception:  # noqa: BLE001 - a callback's failure is its own
            pass


# --- the batching rule, pure: the node's batcher and the simulator (simulate/) apply the same one --------------------
def select(waiting: deque, prefill_rows: int, batch: int = 0) -> tuple[list, deque]:
    """(the jobs of the next forward, those left waiting in their order). A forward takes the span of the oldest
    waiting job, each session once, every decode step (one row left) and prompts while prompt rows are in the budget,
    up to `batch` sessions (0: no limit). A job is anything with `model`, `cache`, `rows` and `computed` (a `Job`,
    or the simulator's session)."""
    model = waiting[0].model
    taken, caches, budget, rest = [], set(), prefill_rows, deque()
    for job in waiting:
        decode = job.rows - job.computed == 1
        if (job.model is not model or id(job.cache) in caches or (not decode and budget <= 0)
                or (batch and len(taken) == batch)):
            rest.append(job)
            continue
        if not decode:
            budget -= job.rows - job.computed
        caches.add(id(job.cache))
        taken.append(job)
    return taken, rest


def micro_batch(sessions: int, stages: int) -> int:
    """Sessions per forward where `sessions` go round a ring of `stages` stages: one micro-batch per stage."""
    return max(1, -(-sessions // stages))


def chunk_rows(jobs: list, prefill_rows: int) -> list[int]:
    """Rows each of `jobs` computes in this forward: decode steps one each; prompts share the budget, oldest first
    (a prompt past it still gets one row, so none starves)."""
    budget, chunks = prefill_rows, []
    for job in jobs:
        left = job.rows - job.computed
        # an encoder's input (BERT's) is never chunked: its positions all see each other (the simulator's are decoders)
        whole = left == 1 or not getattr(job.model, "causal", True)
        n = left if whole else max(1, min(left, budget))
        budget -= n if left > 1 else 0
        chunks.append(n)
    return chunks


def _tail(ops: Any, job: Job, n: int) -> Any:
    """The last n rows of the job's output so far."""
    rows = job.outputs[-1] if len(job.outputs) == 1 or job.outputs[-1].shape[0] >= n else ops.concat(job.outputs)
    return rows[rows.shape[0] - n:]


def _split(x: Any, sizes: list[int]) -> list[Any]:
    parts, first = [], 0
    for n in sizes:
        parts.append(x[first:first + n])
        first += n
    return parts


def _settle(future: Future) -> Done:
    def done(job: Job, error: Exception | None) -> None:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(job)
    return done
