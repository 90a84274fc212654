"""Embeddings of a generative model: the mean of its final hidden states (after its last norm), unit length,
as llama.cpp's `--embeddings` pools by default; checked against transformers' Llama on a tiny random model
through /v1/embeddings, /api/embed and /api/embeddings with the official clients."""

import base64

import numpy as np
import ollama
import openai
import pytest
import torch

from duskpool.weights.catalog import BUNDLED_NAME
from tests.api.conftest import TOOL_MODEL

pytestmark = pytest.mark.slow

TEXTS = ["The lighthouse keeper climbed the stairs.", "Paris", "What will the weather be in Paris?"]


@pytest.fixture(scope="module")
def pooled(tool_model):
    """transformers' Llama on the same file: mean of last_hidden_state (which has the final norm), unit length."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModel.from_pretrained(tool_model.parent, gguf_file=tool_model.name).eval()

    def pool(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(torch.tensor([tokens])).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.double().mean(0), dim=0)

    return pool


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a).double(), torch.as_tensor(b).double(), dim=0))


def test_embeddings_match_transformers_through_every_endpoint(tool_url, tool_engine, pooled):
    tokens = [tool_engine.tokenizer.encode(t) for t in TEXTS]
    expected = [pooled(t) for t in tokens]
    client = openai.OpenAI(base_url=f"{tool_url}/v1", api_key="x", max_retries=0, timeout=60)
    answer = client.embeddings.create(model=TOOL_MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in answer.data] == [0, 1, 2]
    assert answer.usage.prompt_tokens == sum(len(t) for t in tokens)
    for data, reference in zip(answer.data, expected, strict=True):
        assert cosine(data.embedding, reference) >= 0.9999
        assert abs(np.linalg.norm(data.embedding) - 1) < 1e-5
    by_ids = client.embeddings.create(model=TOOL_MODEL, input=tokens[0])  # token ids; base64, the client's default
    assert cosine(by_ids.data[0].embedding, expected[0]) >= 0.9999

    raw = client.with_raw_response.embeddings.create(model=TOOL_MODEL, input=TEXTS[1], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(raw.http_response.json()["data"][0]["embedding"]), dtype="<f4")
    assert cosine(decoded, expected[1]) >= 0.9999

    local = ollama.Client(host=tool_url, timeout=60)
    embedded = local.embed(model=TOOL_MODEL, input=TEXTS)
    assert [cosine(e, r) >= 0.9999 for e, r in zip(embedded.embeddings, expected, strict=True)] == [True] * 3
    assert embedded.prompt_eval_count == sum(len(t) for t in tokens)
    assert cosine(local.embeddings(model=TOOL_MODEL, prompt=TEXTS[2]).embedding, expected[2]) >= 0.9999

    short = local.embed(model=TOOL_MODEL, input=TEXTS[0], dimensions=16).embeddings[0]
    assert len(short) == 16 and abs(np.linalg.norm(short) - 1) < 1e-5
    assert cosine(short, expected[0][:16]) >= 0.9999


def test_embedding_errors(tool_url):
    client = openai.OpenAI(base_url=f"{tool_url}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=TOOL_MODEL, input="")
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.embeddings.create(model=TOOL_MODEL, input=[10**6])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert ollama.Client(host=tool_url).embeddings(model=TOOL_MODEL, prompt="").embedding == []


def test_a_gateway_over_nodes_says_it_cannot_embed_yet(base_url):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError, match="final hidden states") as e:
        client.embeddings.create(model=BUNDLED_NAME, input="hi")
    assert e.value.status_code == 501
