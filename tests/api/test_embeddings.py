"""Embeddings of a generative model: the mean of its final hidden states (after its last norm), unit length,
as llama.cpp's `--embeddings` pools by default; checked against transformers' Llama on a tiny random model
through /v1/embeddings, /api/embed and /api/embeddings with the official clients. A BERT file (an embedding model:
Ollama's all-minilm) against transformers' BertModel, and refusing to generate; a nomic-bert file (Ollama's
nomic-embed-text) against the HF model's equations; and a gateway over a 2-node swarm embedding as the local engine
does, also when a node dies under the request."""

import base64

import anthropic
import numpy as np
import ollama
import openai
import pytest
import torch

from duskpool.api.service import Service
from duskpool.cluster.gateway import Gateway
from duskpool.cluster.swarm import LocalSwarm
from duskpool.engine.runner import LocalEngine
from duskpool.weights.catalog import BUNDLED_NAME
from tests.api.conftest import TOOL_MODEL, live_server
from tests.conftest import wait_for
from tests.tiny_bert import reference_embedding, reference_nomic_embedding, write_tiny_bert, write_tiny_nomic_bert

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
    a, b = (x.double() if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x), dtype=torch.float64)
            for x in (a, b))  # lists, arrays or tensors
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


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


# --- BERT: an embedding model ------------------------------------------------------------------------------------
BERT_MODEL = "tiny-bert"
BERT_TEXTS = ["The lighthouse keeper climbed the stairs.", "Café naïve ÜBER-cool, 12345 tide-pools!!",
              "unknown øre straße 日本語 🙂 ok"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def bert_url(bert):
    service = Service(LocalEngine.load(bert.path), BERT_MODEL, bert.path)
    with live_server(service) as url:
        yield url
    service.close()


def test_bert_embeddings_match_transformers_through_openai_and_ollama(bert, bert_url):
    ids = [bert.tokenizer(text)["input_ids"] for text in BERT_TEXTS]  # transformers' BertTokenizerFast
    expected = [reference_embedding(bert, tokens) for tokens in ids]
    client = openai.OpenAI(base_url=f"{bert_url}/v1", api_key="x", max_retries=0, timeout=60)
    answer = client.embeddings.create(model=BERT_MODEL, input=BERT_TEXTS, encoding_format="float")
    assert answer.usage.prompt_tokens == sum(len(t) for t in ids)
    for data, reference in zip(answer.data, expected, strict=True):
        assert cosine(data.embedding, reference) >= 0.999
        assert abs(np.linalg.norm(data.embedding) - 1) < 1e-5
    assert cosine(client.embeddings.create(model=BERT_MODEL, input=ids[1]).data[0].embedding, expected[1]) >= 0.999

    local = ollama.Client(host=bert_url, timeout=60)
    embedded = local.embed(model=BERT_MODEL, input=BERT_TEXTS)
    assert [cosine(e, r) >= 0.999 for e, r in zip(embedded.embeddings, expected, strict=True)] == [True] * 3
    assert embedded.prompt_eval_count == sum(len(t) for t in ids)
    assert cosine(local.embeddings(model=BERT_MODEL, prompt=BERT_TEXTS[2]).embedding, expected[2]) >= 0.999
    assert local.show(BERT_MODEL).capabilities == ["embedding"]  # as Ollama shows all-minilm
    with pytest.raises(openai.BadRequestError, match="context holds 64"):  # 64 learned positions
        client.embeddings.create(model=BERT_MODEL, input="pool " * 70)


def test_bert_refuses_to_chat_or_complete(bert_url):
    client = openai.OpenAI(base_url=f"{bert_url}/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=BERT_MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model=BERT_MODEL, prompt="the lighthouse")
    local = ollama.Client(host=bert_url, timeout=60)
    for call in (lambda: local.chat(model=BERT_MODEL, messages=[{"role": "user", "content": "hi"}]),
                 lambda: local.generate(model=BERT_MODEL, prompt="the lighthouse")):
        with pytest.raises(ollama.ResponseError, match="embedding model") as e:
            call()
        assert e.value.status_code == 400
    claude = anthropic.Anthropic(base_url=bert_url, api_key="x", max_retries=0, timeout=60)
    with pytest.raises(anthropic.BadRequestError, match="embedding model"):
        claude.messages.create(model=BERT_MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])


# --- nomic-bert: an encoder with rotary positions -----------------------------------------------------------------
NOMIC_MODEL = "tiny-nomic-bert"
NOMIC_TEXTS = ["search_query: What will the weather be in Paris?", "search_document: The lighthouse keeper climbed."]


@pytest.fixture(scope="module")
def nomic(tmp_path_factory):
    return write_tiny_nomic_bert(tmp_path_factory.mktemp("nomic"))


def test_nomic_bert_embeddings_match_the_hf_model_through_openai(nomic):
    """The task prefixes nomic-embed-text wants are the caller's text: embedded as written."""
    expected = [reference_nomic_embedding(nomic, nomic.tokenizer(text)["input_ids"]) for text in NOMIC_TEXTS]
    service = Service(LocalEngine.load(nomic.path), NOMIC_MODEL, nomic.path)
    try:
        with live_server(service) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
            answer = client.embeddings.create(model=NOMIC_MODEL, input=NOMIC_TEXTS, encoding_format="float")
            capabilities = ollama.Client(host=url, timeout=60).show(NOMIC_MODEL).capabilities
    finally:
        service.close()
    for data, reference in zip(answer.data, expected, strict=True):
        assert cosine(data.embedding, reference) >= 0.999
        assert abs(np.linalg.norm(data.embedding) - 1) < 1e-5
    assert capabilities == ["embedding"]


# --- over a swarm ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swarm2(tmp_path_factory):
    with LocalSwarm(2, cache_root=tmp_path_factory.mktemp("swarm2")) as swarm:
        yield swarm


@pytest.mark.parametrize(("family", "texts", "reference"), [("bert", BERT_TEXTS, reference_embedding),
                                                            ("nomic", NOMIC_TEXTS, reference_nomic_embedding)])
def test_an_encoder_over_two_nodes_embeds_as_its_reference_does(swarm2, request, family, texts, reference):
    """Every layer on the nodes (the gateway keeps only the embedding), one span each: the encoder run as spans, each
    input through every stage's batcher in one piece (nomic-bert's nodes are sent what its span reads, no position
    table and no biases, and rotate from position 0)."""
    model = request.getfixturevalue(family)
    gateway = Gateway.start(model.path, swarm2.addresses, identity=swarm2.gateway_identity, even_split=True,
                            prefix=0, suffix=0, progress=False)
    try:
        assert [(s.start, s.stop) for s in gateway.route] == [(0, 1), (1, 2)]
        for text in texts:
            tokens = gateway.tokenizer.encode(text)
            assert cosine(gateway.embed(tokens), reference(model, tokens)) >= 0.999
    finally:
        gateway.close()


@pytest.fixture(scope="module")
def two_nodes(swarm2, bundled_model):
    """A gateway over the 2-node swarm with the bundled model, each span also on the other node (replicas=1)."""
    gateway = Gateway.start(bundled_model, swarm2.addresses, identity=swarm2.gateway_identity, even_split=True,
                            replicas=1, progress=False)
    try:
        yield swarm2, gateway
    finally:
        gateway.close()


@pytest.fixture(scope="module")
def bundled_engine(bundled_model):
    return LocalEngine.load(bundled_model)


def test_a_gateway_over_two_nodes_embeds_as_the_local_engine_does(two_nodes, bundled_model, bundled_engine):
    _, gateway = two_nodes
    service = Service(gateway, BUNDLED_NAME, bundled_model)
    try:
        with live_server(service) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
            answer = client.embeddings.create(model=BUNDLED_NAME, input=TEXTS, encoding_format="float")
            remote = ollama.Client(host=url, timeout=120).embed(model=BUNDLED_NAME, input=TEXTS[0]).embeddings[0]
    finally:
        service.close()
    local = [bundled_engine.embed(bundled_engine.tokenizer.encode(text)) for text in TEXTS]
    for data, expected in zip(answer.data, local, strict=True):
        assert cosine(data.embedding, expected) >= 0.9999
    assert cosine(remote, local[0]) >= 0.9999


def test_an_embedding_survives_a_node_dying_under_it(two_nodes, bundled_engine):
    """The session's route loses a node before its step: it moves to the replica and re-runs the input there."""
    swarm, gateway = two_nodes
    assert all(len(holders) == 2 for holders in gateway.holders.values()), gateway.holders
    tokens = bundled_engine.tokenizer.encode(TEXTS[0])
    session = gateway.open_session(len(tokens))
    try:
        victim = session.route[0]
        swarm.kill(swarm.addresses.index(victim.address))
        assert wait_for(lambda: any(d.address == victim.address for d in gateway.deaths))
        hidden = session.final_hidden(tokens, 0)
    finally:
        session.close()
    [recovery] = gateway.recoveries
    assert victim.address not in {s.address for s in recovery.route}
    local = bundled_engine.open_session(len(tokens))
    expected = local.final_hidden(tokens, 0)
    local.close()
    rows = torch.nn.functional.cosine_similarity(hidden.double(), expected.double(), dim=1)
    assert rows.min() >= 0.9999, f"hidden states after the recovery differ: cosine {rows.min():.6f}"
