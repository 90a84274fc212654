"""BERT (arch "bert", what Ollama's all-minilm is) against transformers' BertModel, and its WordPiece tokenizer against
transformers' BertTokenizerFast. The tiny random model is written to GGUF as llama.cpp's converter writes it
(tests/tiny_bert.py); ours reads that file, theirs is the model the file was written from."""

import importlib.util
from collections.abc import Callable

import gguf
import numpy as np
import pytest
import torch

from duskpool.backends import load_span
from duskpool.engine.batcher import Batcher
from duskpool.engine.generate import GenerationParams
from duskpool.engine.runner import CannotGenerate, LocalEngine, load_tokenizer
from duskpool.engine.tokenizer import Tokenizer
from duskpool.models import SpanModel
from duskpool.models.bert import Bert, BertConfig
from duskpool.weights.gguf import GGUFFile, ModelFileError
from tests.tiny_bert import Q, reference_embedding, write_tiny_bert

NEEDS_MLX = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="MLX is not installed")
TEXTS = ["The lighthouse keeper climbed the stairs.", "Paris", "What will the weather be in Paris?",
         "Café naïve ÜBER-cool, 12345 tide-pools!!", "unknown øre straße 日本語 🙂 [MASK] ok"]
MIXED = TEXTS + ["  spaces\tand\nnewlines  ", "x" * 120, "Ünknown wörds... 3.14 $5 #hash @at", "ﬁne ＡＢＣ Ⅻ ½ ẞ",
                 "the houses keepers' rock-pooling overly", "inside [CLS] and [SEP] text [UNK]", "",
                 "\u200b\u0000 ctrl"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert"))


def hidden_states(spans, tokens: list[int]) -> torch.Tensor:
    """The final hidden states [T, dim] through `spans` in order, as float32 torch (any backend)."""
    hidden = spans[0].embed(tokens)
    for span in spans:
        hidden = span.forward_span(hidden, span.new_cache(len(tokens)), 0)
    data = spans[-1].hidden_to_bytes(spans[-1].final_norm(hidden), "float32")
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(len(tokens), -1).copy())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def assert_embeds_whole_and_in_spans(file: GGUFFile, backend: str, texts: list[str],
                                     tokenize: Callable[[str], list[int]],
                                     reference: Callable[[list[int]], torch.Tensor], what: str) -> SpanModel:
    """For each text, the whole model's mean-pooled hidden states against `reference`, and two spans of one layer
    each giving the whole model's hidden states; the whole model, for the caller's own checks."""
    whole = load_span(file, backend_name=backend)
    spans = [load_span(file, range(0, 1), head=False, backend_name=backend),
             load_span(file, range(1, 2), embed=False, backend_name=backend)]
    for text in texts:
        tokens = tokenize(text)
        ours = hidden_states([whole], tokens)
        assert cosine(ours.double().mean(0), reference(tokens)) >= 0.999, f"{what}: {text!r}"
        assert torch.allclose(hidden_states(spans, tokens), ours, atol=1e-5), "two spans changed the hidden states"
    return whole


def test_the_tokenizer_gives_transformers_ids_on_mixed_text(bert):
    ours = load_tokenizer(GGUFFile(bert.path))
    for text in MIXED:
        theirs = bert.tokenizer(text)["input_ids"]
        assert ours.encode(text) == theirs, f"{text!r}: {ours.encode(text)} != {theirs}"
    assert ours.encode("Café") == [ours.bos_id, ours.tokens.index("\u2581cafe"), ours.eos_id]  # lowercased, unaccented
    assert ours.decode(ours.encode("The houses, unknown!")) == "the houses, unknown!"
    assert ours.chat_template is None


def test_a_cased_vocabulary_keeps_case_and_accents():
    transformers = pytest.importorskip("transformers")
    vocab = ["[UNK]", "[CLS]", "[SEP]", "Cafe", "café", "cafe", "C", "##a", "##f", "##e", "##é"]
    theirs = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False)
    tokens = [t if t.startswith("[") else t[2:] if t.startswith("##") else "\u2581" + t for t in vocab]
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 8, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.cls_token_id": 1, "tokenizer.ggml.seperator_token_id": 2}  # older files: cls and sep
    ours = Tokenizer.from_gguf_metadata(meta)
    for text in ["Cafe café Cafés", "CAFE cafe Café", "Caféf"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    assert ours.encode("Café")[1:-1] == [6, 7, 8, 10]  # not lowercased, not stripped of its accent


@pytest.mark.parametrize("backend", ["cpu", pytest.param("mlx", marks=NEEDS_MLX)])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0], ids=lambda q: q.name)
def test_bert_embeds_as_transformers_does_whole_and_in_spans(tmp_path, bert, qtype, backend):
    path = write_tiny_bert(tmp_path, qtype).path if qtype != Q.F32 else bert.path
    whole = assert_embeds_whole_and_in_spans(GGUFFile(path), backend, TEXTS, lambda t: bert.tokenizer(t)["input_ids"],
                                             lambda tokens: reference_embedding(bert, tokens),
                                             f"{qtype.name} {backend}")
    assert type(whole) is Bert and not whole.causal and whole.pooling == "mean"


@pytest.mark.parametrize("backend", ["cpu", pytest.param("mlx", marks=NEEDS_MLX)])
def test_the_engine_pools_as_the_file_says_and_will_not_generate(tmp_path, bert, backend):
    mean = LocalEngine.load(bert.path, backend_name=backend)
    cls = LocalEngine.load(write_tiny_bert(tmp_path, pooling=gguf.PoolingType.CLS).path, backend_name=backend)
    assert cls.pooling == "cls"
    tokens = mean.tokenizer.encode(TEXTS[0])
    assert cosine(mean.embed(tokens), reference_embedding(bert, tokens)) >= 0.999
    assert cosine(cls.embed(tokens), reference_embedding(bert, tokens, "cls")) >= 0.999
    with pytest.raises(CannotGenerate, match="embedding model"):
        next(mean.generate(tokens, GenerationParams()))
    with pytest.raises(ValueError, match="whole input"):  # an encoder's input cannot be continued later
        mean.model.forward_span(mean.model.embed(tokens[:2]), mean.model.new_cache(8), 2)


def test_a_batcher_never_splits_an_encoders_input(bert):
    """A stage's batcher cuts prompts into chunks of `prefill_rows`; an encoder's chunk could not see the next."""
    span = load_span(GGUFFile(bert.path))
    tokens = bert.tokenizer(" ".join(TEXTS[:3]))["input_ids"]
    batcher = Batcher(prefill_rows=8)
    try:
        hidden = batcher.run(span, span.new_cache(len(tokens)), 0, span.embed(tokens)).output
    finally:
        batcher.close()
    whole = span.forward_span(span.embed(tokens), span.new_cache(len(tokens)), 0)
    assert len(tokens) > 8 and torch.equal(hidden, whole)


def test_a_reranker_is_refused():
    meta = {"bert.embedding_length": 64, "bert.block_count": 2, "bert.attention.head_count": 4,
            "bert.feed_forward_length": 128, "bert.context_length": 64, "bert.vocab_size": 10,
            "bert.pooling_type": int(gguf.PoolingType.RANK)}
    with pytest.raises(ModelFileError, match="reranker"):
        BertConfig.from_gguf(meta)
    assert BertConfig.from_gguf({**meta, "bert.pooling_type": 0}).pooling == "mean"  # none: mean, one vector
