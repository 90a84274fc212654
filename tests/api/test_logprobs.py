"""logprobs from the gateway's own logits (a 3-node swarm): for greedy tokens, the log-softmax of the logits
the engine computes for the same context, within 1e-4, through OpenAI's chat and completions and Ollama."""

import math

import ollama
import openai
import pytest
import torch

from duskpool.weights.catalog import BUNDLED_NAME

pytestmark = pytest.mark.slow

STEPS = 8


def reference(gateway, prompt: list[int], steps: int = STEPS) -> list[torch.Tensor]:
    """log-softmax of the logits at each greedy step."""
    session, out, step, position = gateway.open_session(len(prompt) + steps), [], prompt, 0
    try:
        for _ in range(steps):
            logp = torch.log_softmax(session.forward(step, position).double(), 0)
            out.append(logp)
            position += len(step)
            step = [int(logp.argmax())]
    finally:
        session.close()
    return out


def check(got_ids: list[int], got_logprobs: list[float], tops: list[list[int]], expected: list[torch.Tensor]):
    assert got_ids and len(got_ids) <= len(expected)
    for token, logprob, top, logp in zip(got_ids, got_logprobs, tops, expected, strict=False):
        assert token == int(logp.argmax())
        assert abs(logprob - float(logp[token])) < 1e-4, (logprob, float(logp[token]))
        assert top == logp.topk(len(top)).indices.tolist()


def ids(gateway, tokens: list[str]) -> list[int]:
    vocabulary = gateway.vocabulary
    by_text = {vocabulary.token_bytes(i).decode(errors="replace"): i for i in range(gateway.tokenizer.vocab_size)}
    return [by_text[t] for t in tokens]


def test_openai_chat_logprobs_are_the_reference_log_softmax(base_url, gateway):
    messages = [{"role": "user", "content": "Name three colors of the rainbow."}]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)
    answer = client.chat.completions.create(model=BUNDLED_NAME, messages=messages, temperature=0, max_tokens=STEPS,
                                            logprobs=True, top_logprobs=3).choices[0]
    content = answer.logprobs.content
    assert "".join(t.token for t in content) == answer.message.content
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    prompt = gateway.tokenizer.encode(gateway.tokenizer.render_chat(messages))
    check(ids(gateway, [t.token for t in content]), [t.logprob for t in content],
          [ids(gateway, [a.token for a in t.top_logprobs]) for t in content], reference(gateway, prompt))
    streamed = client.chat.completions.create(model=BUNDLED_NAME, messages=messages, temperature=0, max_tokens=STEPS,
                                              logprobs=True, stream=True)
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in content]


def test_openai_completions_and_ollama_logprobs(base_url, gateway):
    text = "The capital of France is"
    expected = reference(gateway, gateway.tokenizer.encode(text))
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)
    logprobs = client.completions.create(model=BUNDLED_NAME, prompt=text, temperature=0, max_tokens=STEPS,
                                         logprobs=2).choices[0].logprobs
    check(ids(gateway, logprobs.tokens), logprobs.token_logprobs,
          [ids(gateway, list(top)) for top in logprobs.top_logprobs], expected)

    messages = [{"role": "user", "content": "Say something about the sea."}]
    answer = ollama.Client(host=base_url, timeout=60).chat(
        model=BUNDLED_NAME, messages=messages, logprobs=True, top_logprobs=2,
        options={"temperature": 0, "num_predict": STEPS, "repeat_penalty": 1.0})
    prompt = gateway.tokenizer.encode(gateway.tokenizer.render_chat(messages))
    got = answer.logprobs
    check(ids(gateway, [t.token for t in got]), [t.logprob for t in got],
          [ids(gateway, [a.token for a in t.top_logprobs]) for t in got], reference(gateway, prompt))
    assert all(t.logprob <= 0 and math.isfinite(t.logprob) for t in got)
