"""The official `openai` and `ollama` clients, unchanged, against a live server on a 3-node swarm."""

import ollama
import openai
import pytest
import torch

from duskpool.weights.catalog import BUNDLED_NAME

pytestmark = pytest.mark.slow

QUESTION = "Name three colors of the rainbow."
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ollama_client(base_url):
    return ollama.Client(host=base_url, timeout=60)


def expected_text(gateway, messages: list[dict], max_tokens: int) -> str:
    """The greedy answer straight from the engine, without HTTP."""
    prompt = gateway.tokenizer.encode(gateway.tokenizer.render_chat(messages))
    session, tokens, step, position = gateway.open_session(len(prompt) + max_tokens), [], prompt, 0
    try:
        for _ in range(max_tokens):
            token = int(torch.argmax(session.forward(step, position)))
            if token in gateway.tokenizer.stop_ids:
                break
            tokens.append(token)
            position += len(step)
            step = [token]
    finally:
        session.close()
    return gateway.tokenizer.decode(tokens)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [BUNDLED_NAME]
    assert client.models.retrieve(BUNDLED_NAME).id == BUNDLED_NAME


def test_chat_streamed_equals_non_streamed_equals_engine(client, gateway):
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=BUNDLED_NAME, messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model=BUNDLED_NAME, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    text = whole.choices[0].message.content
    assert text and streamed == text
    assert text == expected_text(gateway, messages, GREEDY["max_tokens"])
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_completions_streamed_equals_non_streamed(client):
    whole = client.completions.create(model=BUNDLED_NAME, prompt="The capital of France is", **GREEDY)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=BUNDLED_NAME, prompt="The capital of France is", stream=True, **GREEDY))
    assert whole.choices[0].text and streamed == whole.choices[0].text
    assert whole.usage.completion_tokens == GREEDY["max_tokens"] or whole.choices[0].finish_reason == "stop"


def test_stop_and_seed(client):
    base = {"model": BUNDLED_NAME, "messages": [{"role": "user", "content": "Count from 1 to 10."}],
            "max_tokens": 40}
    greedy = client.chat.completions.create(**base, temperature=0).choices[0].message.content
    cut = client.chat.completions.create(**base, temperature=0, stop=["5"]).choices[0]
    assert "5" in greedy and cut.message.content == greedy[:greedy.index("5")] and cut.finish_reason == "stop"
    seeded = [client.chat.completions.create(**base, temperature=1.0, seed=7).choices[0].message.content
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_unknown_model_is_a_404_for_the_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_ollama_chat_and_generate(ollama_client, client):
    options = {"temperature": 0, "num_predict": 24}
    messages = [{"role": "user", "content": QUESTION}]
    whole = ollama_client.chat(model=BUNDLED_NAME, messages=messages, options=options)
    streamed = list(ollama_client.chat(model=BUNDLED_NAME, messages=messages, options=options, stream=True))
    assert whole.message.content and "".join(p.message.content for p in streamed) == whole.message.content
    assert streamed[-1].done and streamed[-1].eval_count == whole.eval_count > 0
    assert whole.prompt_eval_count > 0 and whole.eval_duration > 0 and whole.total_duration >= whole.eval_duration
    # the same greedy answer through either API (Ollama's repeat_penalty default is 1.1: turn it off)
    same = ollama_client.chat(model=BUNDLED_NAME, messages=messages, options=options | {"repeat_penalty": 1.0})
    openai_text = client.chat.completions.create(model=BUNDLED_NAME, messages=messages, **GREEDY)
    assert same.message.content == openai_text.choices[0].message.content

    generated = ollama_client.generate(model=BUNDLED_NAME, prompt=QUESTION, options=options)
    assert generated.response and generated.done and generated.done_reason in ("stop", "length")
    pieces = list(ollama_client.generate(model=BUNDLED_NAME, prompt=QUESTION, options=options, stream=True))
    assert "".join(p.response for p in pieces) == generated.response


def test_ollama_listing_endpoints(ollama_client):
    tags = ollama_client.list()
    assert [m.model for m in tags.models] == [BUNDLED_NAME]
    assert tags.models[0].details.family == "llama" and tags.models[0].details.quantization_level == "Q4_1"
    assert [m.model for m in ollama_client.ps().models] == [BUNDLED_NAME]
    shown = ollama_client.show(BUNDLED_NAME)
    assert "im_start" in shown.template and shown.modelinfo["llama.block_count"] == 30
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.show("llama3.2:3b")
    assert e.value.status_code == 404
