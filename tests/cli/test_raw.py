"""A base model (no chat template) is completed as raw text by `duskpool run`, which says so once; `--raw` does the
same for a chat model; the chat endpoints refuse a base model with a 400 that says why."""

from dataclasses import dataclass

import httpx
import pytest

from duskpool.api.service import Service
from duskpool.cli.main import main
from duskpool.engine.generate import GenerationParams
from duskpool.engine.runner import LocalEngine
from tests.api.conftest import live_server

pytestmark = pytest.mark.slow


@dataclass
class Ran:
    code: int
    out: str
    err: str


def run(capsys, *args: str) -> Ran:
    """`duskpool run ARGS` in this process (the CLI's own entry point, without a second torch start-up)."""
    code = main(["run", "--threads", "1", *args])
    captured = capsys.readouterr()
    return Ran(code, captured.out, captured.err)


@pytest.fixture(scope="module")
def gemma(gemma_model) -> LocalEngine:
    return LocalEngine.load(gemma_model, 256)


def raw_completion(engine: LocalEngine, prompt: str, max_tokens: int) -> str:
    ids = engine.tokenizer.encode(prompt, add_special=True)
    return "".join(engine.generate(ids, GenerationParams(max_tokens=max_tokens)))


def test_a_base_model_is_completed_as_raw_text(gemma, gemma_model, capsys):
    prompt = "The three primary colours are"
    done = run(capsys, "--model", str(gemma_model), "--max-tokens", "12", prompt)
    assert done.code == 0, done.err
    assert done.err.count("no chat template") == 1
    assert done.out.rstrip("\n") == raw_completion(gemma, prompt, 12)


def test_raw_completes_a_chat_model_without_its_template(bundled_model, capsys):
    prompt = "Once upon a time"
    done = run(capsys, "--raw", "--max-tokens", "12", prompt)
    assert done.code == 0, done.err
    assert "no chat template" not in done.err
    assert done.out.rstrip("\n") == raw_completion(LocalEngine.load(bundled_model), prompt, 12)
    refused = run(capsys, "--raw", "--system", "be brief", prompt)
    assert refused.code != 0 and "--system needs the chat template" in refused.err


def test_chat_endpoints_refuse_a_base_model_and_completions_serve_it(gemma, gemma_model):
    service = Service(gemma, "gemma3:270m", gemma_model)
    try:
        with live_server(service) as url:
            chat = httpx.post(f"{url}/v1/chat/completions", json={
                "model": "gemma3:270m", "messages": [{"role": "user", "content": "Hi"}]}, timeout=60)
            assert chat.status_code == 400 and "no chat template" in chat.json()["error"]["message"]
            ollama_chat = httpx.post(f"{url}/api/chat", json={
                "model": "gemma3:270m", "messages": [{"role": "user", "content": "Hi"}], "stream": False}, timeout=60)
            assert ollama_chat.status_code == 400 and "no chat template" in ollama_chat.json()["error"]
            body = {"model": "gemma3:270m", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
            completion = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            expected = raw_completion(gemma, "The capital of France is", 6)
            assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == expected
            generated = httpx.post(f"{url}/api/generate", json={
                "model": "gemma3:270m", "prompt": "The capital of France is", "stream": False,
                "options": {"num_predict": 6, "temperature": 0, "repeat_penalty": 1.0}}, timeout=60)
            assert generated.status_code == 200 and generated.json()["response"] == expected
    finally:
        service.close()
