"""A tiny random BERT (transformers' BertModel: hidden 64, 2 layers) with a tiny WordPiece vocabulary, written to GGUF
as llama.cpp's convert_hf_to_gguf.py writes arch "bert" (class BertModel there): the tokenizer's vocabulary in its
"phantom space" spelling, special ids from gguf-py's own SpecialVocab (what the converter calls), 1-D tensors, norms,
position and token-type embeddings in F32 and the other matrices in the file type asked for.

And a tiny random nomic-bert (arch "nomic-bert", class NomicBertModel there: nomic-embed-text) with the same
vocabulary. transformers has no NomicBert of its own (the model's code comes with its checkpoint), so its weights are
a state dict under the HF model's names, and `reference_nomic_embedding` is that model's forward written out in
plain torch from its equations (modeling_hf_nomic_bert.py: NomicBertEmbeddings, NomciBertAttention with
rotate_half, NomciBertGatedMLP, NomicBertBlock with prenorm False)."""

import math
import string
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch

from tests.conftest import add_weight

Q = gguf.GGMLQuantizationType
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "of", "and", "is", "cafe", "naive", "light", "house", "keeper", "climbed", "stairs", "what",
         "will", "weather", "be", "in", "paris", "##s", "##ed", "##ing", "##er", "##house", "un", "##known", "rock",
         "pool", "##ly", "over", "tide", "123", "##45"]
# every letter and digit, alone and as a continuation, so that any latin word has a spelling; the punctuation
# BERT splits off; nothing for CJK, emoji or letters without an ASCII decomposition (ø, ß): those are [UNK]
VOCAB = list(dict.fromkeys(SPECIAL + list(string.punctuation) + list(string.ascii_lowercase + string.digits)
                           + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS))


@dataclass
class TinyBert:
    path: Path  # the GGUF file
    model: object  # transformers.BertModel, float32, eval mode
    tokenizer: object  # transformers.BertTokenizerFast


def wordpiece_tokenizer(folder: Path):
    """transformers' BertTokenizerFast over VOCAB, saved in `folder` (tokenizer.json and tokenizer_config.json,
    which SpecialVocab reads)."""
    transformers = __import__("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def add_vocabulary(writer: gguf.GGUFWriter, tokenizer, folder: Path, token_type_count: int) -> None:
    """BertModel.set_vocab: added (special) tokens are control tokens; the rest are spelled with a phantom space
    ('▁' + word) or, for continuations, without their '##'."""
    added = set(tokenizer.get_added_vocab())
    types = [gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in VOCAB]
    tokens = [t if k == gguf.TokenType.CONTROL else t[2:] if t.startswith("##") else "\u2581" + t
              for t, k in zip(VOCAB, types, strict=True)]
    writer.add_token_type_count(token_type_count)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def write_tiny_bert(folder: Path, qtype: Q = Q.F32, pooling: gguf.PoolingType = gguf.PoolingType.MEAN,
                    seed: int = 0) -> TinyBert:
    transformers = __import__("transformers")
    tokenizer = wordpiece_tokenizer(folder)
    config = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, type_vocab_size=2,
                                     initializer_range=0.1)
    torch.manual_seed(seed)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # norms and biases random too (transformers starts them at 1 and 0)
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter) * 0.2)

    path = folder / f"tiny-bert-{qtype.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_name("tiny-bert")
    # TextModel.set_gguf_parameters, then BertModel's own
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling)  # from a sentence-transformers Pooling module, when the model has one
    add_vocabulary(writer, tokenizer, folder, config.type_vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "embeddings.position_ids":
            continue
        name, data = names.get_name(hf_name, try_suffixes=(".weight", ".bias")), tensor.numpy()
        f32 = (data.ndim == 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
               or name.startswith(("position_embd", "token_types")))
        add_weight(writer, name, data, Q.F32 if f32 else qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return TinyBert(path, model, tokenizer)


def reference_embedding(bert: TinyBert, tokens: list[int], pooling: str = "mean") -> torch.Tensor:
    """transformers' BertModel: the last hidden state's mean (or [CLS] row), unit length, float64."""
    with torch.no_grad():
        hidden = bert.model(torch.tensor([tokens])).last_hidden_state[0].double()
    return torch.nn.functional.normalize(hidden.mean(0) if pooling == "mean" else hidden[0], dim=0)


# --- nomic-bert ---------------------------------------------------------------------------------------------------
@dataclass
class TinyNomicBert:
    path: Path  # the GGUF file
    weights: dict[str, torch.Tensor]  # the HF model's state dict (float32), under its own names
    tokenizer: object  # transformers.BertTokenizerFast
    heads: int
    rope_base: float  # rotary_emb_base


def write_tiny_nomic_bert(folder: Path, qtype: Q = Q.F32, seed: int = 0, dim: int = 64, layers: int = 2,
                          heads: int = 4, ffn: int = 128, rope_base: float = 1000.0) -> TinyNomicBert:
    """As NomicBertModel in convert_hf_to_gguf.py writes nomic-embed-text: no position embeddings, no biases but
    the norms', Wqkv fused (attn_qkv), fc11 -> ffn_up, fc12 -> ffn_gate, mean pooling, rope.freq_base."""
    tokenizer = wordpiece_tokenizer(folder)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, mean: float = 0.0) -> torch.Tensor:  # large enough that attention, so RoPE, matters
        return mean + 0.2 * torch.randn(*shape, generator=generator)

    weights = {"embeddings.word_embeddings.weight": randn(len(VOCAB), dim),
               "embeddings.token_type_embeddings.weight": randn(2, dim),
               "emb_ln.weight": randn(dim, mean=1), "emb_ln.bias": randn(dim)}
    for i in range(layers):
        block = f"encoder.layers.{i}."
        weights |= {block + "attn.Wqkv.weight": randn(3 * dim, dim), block + "attn.out_proj.weight": randn(dim, dim),
                    block + "mlp.fc11.weight": randn(ffn, dim), block + "mlp.fc12.weight": randn(ffn, dim),
                    block + "mlp.fc2.weight": randn(dim, ffn)}
        for norm in ("norm1", "norm2"):
            weights |= {block + f"{norm}.weight": randn(dim, mean=1), block + f"{norm}.bias": randn(dim)}

    path = folder / f"tiny-nomic-bert-{qtype.name}.gguf"
    writer = gguf.GGUFWriter(str(path), "nomic-bert")
    writer.add_name("tiny-nomic-bert")
    writer.add_block_count(layers)
    writer.add_context_length(2048)  # n_positions, as the converter sets it for nomic-embed-text v1 and v1.5
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_layer_norm_eps(1e-12)
    writer.add_rope_freq_base(rope_base)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    add_vocabulary(writer, tokenizer, folder, 2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NOMIC_BERT, layers)
    for hf_name, tensor in weights.items():
        name, data = names.get_name(hf_name, try_suffixes=(".weight", ".bias")), tensor.numpy()
        f32 = data.ndim == 1 or name.startswith("token_types")
        add_weight(writer, name, data, Q.F32 if f32 else qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return TinyNomicBert(path, weights, tokenizer, heads, rope_base)


def reference_nomic_embedding(nomic: TinyNomicBert, tokens: list[int]) -> torch.Tensor:
    """The HF NomicBertModel's forward on one input (no padding, token types 0), mean-pooled, unit length,
    in float64: plain torch from its equations, nothing of duskpool's."""
    w = {name: tensor.double() for name, tensor in nomic.weights.items()}
    T, dim = len(tokens), w["emb_ln.weight"].shape[0]
    H, d = nomic.heads, dim // nomic.heads

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (dim,), w[f"{name}.weight"], w[f"{name}.bias"], 1e-12)

    # NomicBertRotaryEmbedding, not interleaved: the first half of a head pairs with its second half
    inv_freq = 1.0 / nomic.rope_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # [T, d/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]

    def rotary(x: torch.Tensor) -> torch.Tensor:  # x: [T, H, d]
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin  # rotate_half

    x = w["embeddings.word_embeddings.weight"][tokens] + w["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, "emb_ln")
    for i in range(sum(name.endswith("attn.Wqkv.weight") for name in w)):
        block = f"encoder.layers.{i}."
        qkv = (x @ w[block + "attn.Wqkv.weight"].T).view(T, 3, H, d)  # "... (three h d) -> ... three h d"
        q, k, v = rotary(qkv[:, 0]), rotary(qkv[:, 1]), qkv[:, 2]
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(d)
        attended = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, dim)
        x = layer_norm(x + attended @ w[block + "attn.out_proj.weight"].T, block + "norm1")
        y, gate = x @ w[block + "mlp.fc11.weight"].T, x @ w[block + "mlp.fc12.weight"].T
        x = layer_norm(x + (y * torch.nn.functional.silu(gate)) @ w[block + "mlp.fc2.weight"].T, block + "norm2")
    return torch.nn.functional.normalize(x.mean(0), dim=0)
