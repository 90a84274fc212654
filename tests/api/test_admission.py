"""Admission follows lent memory: requests past what the memory holds KV for queue and complete; past the queue, 429."""

import asyncio
import math

import pytest

from duskpool.api.service import Overloaded, Service
from duskpool.cluster.admission import KV_SHARE
from duskpool.engine.generate import GenerationParams, GenerationStats
from duskpool.engine.runner import LocalEngine
from duskpool.engine.sampling import SamplingParams
from duskpool.weights.catalog import BUNDLED_NAME

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def engine(bundled_model):
    return LocalEngine.load(bundled_model, 512)


def holding(service: Service, sessions: int, prompt: list[int]) -> None:
    """Lend the service memory for the KV of `sessions` generations of `prompt`, and no more."""
    spec = service.engine.spec
    kv_bytes = sessions * (len(prompt) + MAX_TOKENS) * spec.kv_bytes_per_token * spec.n_layers
    service.lent_memory = math.ceil(kv_bytes / KV_SHARE) + 1  # admission reserves KV_SHARE of what is lent


async def answer(service: Service, prompt: list[int]) -> str:
    params = GenerationParams(max_tokens=MAX_TOKENS, sampling=SamplingParams(temperature=0.0))
    return "".join([piece async for piece in service.generate(prompt, params, "test", GenerationStats())])


def test_requests_past_the_memory_queue_and_complete(engine, bundled_model):
    service = Service(engine, BUNDLED_NAME, bundled_model)
    prompt = engine.tokenizer.encode("Name a colour.")
    holding(service, 2, prompt)
    peak = 0

    async def main() -> list[str]:
        nonlocal peak

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, len(service.generations))
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*[answer(service, prompt) for _ in range(6)])
        finally:
            watcher.cancel()

    try:
        answers = asyncio.run(main())
    finally:
        service.close()
    assert len(set(answers)) == 1 and answers[0], "the queued requests did not get the same greedy answer"
    assert peak == 2, f"{peak} generations ran at once; the memory holds 2"


def test_past_the_queue_429(engine, bundled_model):
    service = Service(engine, BUNDLED_NAME, bundled_model, max_queue=1)
    prompt = engine.tokenizer.encode("Name a colour.")
    holding(service, 1, prompt)

    async def main() -> list:
        return await asyncio.gather(*[answer(service, prompt) for _ in range(3)], return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        service.close()
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 1 and refused[0].status == 429, results
    assert sum(isinstance(r, str) for r in results) == 2
