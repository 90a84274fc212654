"""A tiny random BERT (transformers' BertModel: hidden 64, 2 layers) with a tiny WordPiece vocabulary, written to GGUF
as llama.cpp's convert_hf_to_gguf.py writes arch "bert" (class BertModel there): the tokenizer's vocabulary in its
"phantom space" spelling, special ids from gguf-py's own SpecialVocab (what the converter calls), 1-D tensors, norms,
position and token-type embeddings in F32 and the other matrices in the file type asked for."""

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


def write_tiny_bert(folder: Path, qtype: Q = Q.F32, pooling: gguf.PoolingType = gguf.PoolingType.MEAN,
                    seed: int = 0) -> TinyBert:
    transformers = __import__("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = transformers.BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)  # tokenizer.json and tokenizer_config.json, which SpecialVocab reads
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
    # BertModel.set_vocab: added (special) tokens are control tokens; the rest are spelled with a phantom space
    # ('▁' + word) or, for continuations, without their '##'
    added = set(tokenizer.get_added_vocab())
    types = [gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in VOCAB]
    tokens = [t if k == gguf.TokenType.CONTROL else t[2:] if t.startswith("##") else "\u2581" + t
              for t, k in zip(VOCAB, types, strict=True)]
    writer.add_token_type_count(config.type_vocab_size)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)

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
