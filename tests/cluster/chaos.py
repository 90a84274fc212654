"""Chaos on a local swarm: concurrent greedy streams while nodes are killed (kill -9) and restarted.

Used by tests/cluster/test_recovery.py (CI-sized) and benchmarks/chaos.py (longer). Each answer is compared
with the same prompt's answer from a run without faults: the same tokens, or else the first difference must
be a near tie in the fault-free logits (re-prefilling a history in one batch rounds differently from feeding
it token by token, by ~1e-5 here), never a gap or a duplicated token.
"""

import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from duskpool.cluster.gateway import Gateway
from duskpool.cluster.swarm import LocalSwarm
from duskpool.engine.generate import GenerationParams, GenerationStats, generate
from duskpool.engine.runner import Engine
from duskpool.engine.sampling import SamplingParams

NEAR_TIE = 1e-3  # a top-2 logit margin below this may flip under a different summation order

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
           "Explain recursion to a child.", "Translate 'good morning' into Spanish.", "Name a famous painter.",
           "Why is the sky blue?", "Give me a tip for learning to cook."]


@dataclass
class Answer:
    tokens: list[int]  # generated, in order
    margins: list[float]  # top-1 minus top-2 logit where each token was chosen
    text: str  # as streamed to the client
    token_times: list[float] = field(default_factory=list)  # time.monotonic() of each token
    error: str | None = None


def greedy(max_tokens: int) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, sampling=SamplingParams(temperature=0.0))


def chat_prompt(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.render_chat([{"role": "user", "content": text}]))


def answer(engine: Engine, prompt: list[int], params: GenerationParams,
           on_step: Callable[[int], None] | None = None) -> Answer:
    """Run the real generate loop over a session of `engine`, recording each step's choice and margin.
    `on_step(n)` is called after the n-th step (the prefill is step 1)."""
    capacity = min(engine.context_length, len(prompt) + params.max_tokens)
    session = engine.open_session(capacity)
    chosen, margins, times = [], [], []

    def forward(tokens: list[int], start: int) -> torch.Tensor:
        logits = session.forward(tokens, start)
        top = torch.topk(logits, 2)
        chosen.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
        times.append(time.monotonic())
        if on_step is not None:
            on_step(len(chosen))
        return logits

    stats = GenerationStats()
    try:
        text = "".join(generate(forward, engine.tokenizer, prompt, params, capacity, stats))
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not raised
        return Answer(chosen, margins, "", times, f"{type(e).__name__}: {e}")
    finally:
        session.close()
    n = stats.generated_tokens
    return Answer(chosen[:n], margins[:n], text, times[:n])


def fault_free(engine: Engine, prompts: list[list[int]], params: GenerationParams) -> list[Answer]:
    """Every prompt's answer with no fault, all at once (as the streams of a chaos run will ask them)."""
    answers: list[Answer | None] = [None] * len(prompts)

    def one(i: int) -> None:
        answers[i] = answer(engine, prompts[i], params)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [a.error for a in answers if a.error]
    assert not failed, f"the fault-free run failed: {failed}"
    return answers


def compare(got: Answer, want: Answer) -> str:
    """'identical', 'near tie' (first difference at a fault-free margin < NEAR_TIE), 'gap', 'duplicate',
    'failed' or 'different'."""
    if got.error is not None:
        return "failed"
    if got.tokens == want.tokens and got.text == want.text:
        return "identical"
    i = next((k for k, (a, b) in enumerate(zip(got.tokens, want.tokens, strict=False)) if a != b),
             min(len(got.tokens), len(want.tokens)))
    rest = min(len(got.tokens), len(want.tokens)) - 1
    if i < len(want.tokens) and got.tokens[i:rest] == want.tokens[i + 1:rest + 1] and i < rest:
        return "gap"
    if i > 0 and i < len(got.tokens) and got.tokens[i] == got.tokens[i - 1] \
            and got.tokens[i + 1:rest + 1] == want.tokens[i:rest]:
        return "duplicate"
    if i < len(want.margins) and want.margins[i] < NEAR_TIE:
        return "near tie"
    return "different"


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Kill:
    node: int  # index in the swarm
    address: str
    at: float  # time.monotonic() of the kill
    noticed: float | None = None  # when the gateway counted it gone
    rejoined: float | None = None  # when the restarted node had joined again


@dataclass
class ChaosReport:
    outcomes: dict[str, int]
    requests: int
    kills: list[Kill]
    recoveries: list[float]  # seconds each session took to move to a new route, failure to logits
    replayed: list[int]  # tokens each of them re-prefilled
    longest_wait: float  # the longest any client waited between two tokens
    seconds: float
    notes: list[str]

    @property
    def failed(self) -> int:
        return self.outcomes.get("failed", 0)

    @property
    def detection(self) -> list[float]:
        return [k.noticed - k.at for k in self.kills if k.noticed is not None]

    def summary(self) -> str:
        o = self.outcomes
        lines = [
            f"requests: {self.requests - self.failed} ok / {self.failed} failed over {self.seconds:.0f} s, "
            f"{len(self.kills)} kills",
            f"answers: {o.get('identical', 0)} identical to the fault-free run, {o.get('near tie', 0)} differ at a "
            f"near tie (< {NEAR_TIE:g}), {o.get('different', 0)} differ otherwise; gaps {o.get('gap', 0)}, "
            f"duplicates {o.get('duplicate', 0)}",
            f"detection (kill -> gateway notices): p50 {percentile(self.detection, 50) * 1000:.0f} ms, "
            f"p99 {percentile(self.detection, 99) * 1000:.0f} ms, max {max(self.detection, default=0) * 1000:.0f} ms "
            f"({len(self.detection)} of {len(self.kills)} kills noticed)",
            f"recovery (failed step -> its logits from the new route, per session): {len(self.recoveries)} recoveries, "
            f"p50 {percentile(self.recoveries, 50) * 1000:.0f} ms, p99 {percentile(self.recoveries, 99) * 1000:.0f} ms,"
            f" re-prefilling {statistics.mean(self.replayed) if self.replayed else 0:.0f} tokens on average",
            f"longest wait between two tokens of one answer: {self.longest_wait * 1000:.0f} ms",
        ]
        return "\n".join(lines + self.notes)


def run_chaos(swarm: LocalSwarm, gateway: Gateway, prompts: list[list[int]], references: list[Answer],
              params: GenerationParams, streams: int = 8, kills: int = 20, seed: int = 0,
              pause: tuple[float, float] = (0.3, 1.5)) -> ChaosReport:
    """`streams` threads answer `prompts` round-robin against `gateway` while this thread, `kills` times,
    waits a random pause, kill -9s a random node, restarts it and adds it back to the gateway."""
    rng = random.Random(seed)
    done = threading.Event()
    results: list[tuple[int, Answer]] = []
    lock = threading.Lock()
    first_recovery = len(gateway.recoveries)

    def client(k: int) -> None:
        n = k
        while not done.is_set():
            got = answer(gateway, prompts[n % len(prompts)], params)
            with lock:
                results.append((n % len(prompts), got))
            n += streams

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(streams)]
    for t in threads:
        t.start()
    log: list[Kill] = []
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(*pause))
            i = rng.randrange(len(swarm.processes))
            kill = Kill(i, swarm.addresses[i], time.monotonic())
            swarm.kill(i)
            log.append(kill)
            gateway.add_node(swarm.restart(i))
            kill.rejoined = time.monotonic()
    finally:
        done.set()
        for t in threads:
            t.join()
    seconds = time.monotonic() - started

    noticed = {d.address: d.noticed for d in gateway.deaths}
    for kill in log:
        kill.noticed = noticed.get(kill.address)
    outcomes: dict[str, int] = {}
    notes = []
    for index, got in results:
        outcome = compare(got, references[index])
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome not in ("identical",):
            notes.append(f"prompt {index}: {outcome}" + (f" ({got.error})" if got.error else ""))
    waits = [b - a for _, got in results for a, b in zip(got.token_times, got.token_times[1:], strict=False)]
    recoveries = gateway.recoveries[first_recovery:]
    return ChaosReport(outcomes, len(results), log, [r.seconds for r in recoveries],
                       [r.replayed_tokens for r in recoveries], max(waits, default=0.0), seconds, notes)
