"""A family is one file and one `register` line: a toy family added here (Llama with RoPE over split halves
instead of adjacent pairs) computes what its reference computes and runs through a 2-node local swarm,
with no edit under cluster/."""

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from duskpool import models
from duskpool.backends import load_span
from duskpool.cluster.gateway import Gateway
from duskpool.cluster.node import NodeService
from duskpool.cluster.transport import start_server
from duskpool.engine.runner import LocalEngine
from duskpool.models.llama import Llama, LlamaConfig
from duskpool.weights.gguf import GGUFFile
from tests.conftest import Q, greedy_tokens, write_tiny_llama


@dataclass
class ToyConfig(LlamaConfig):
    rope_pairing: str = "halves"  # GPT-NeoX's pairing: element i rotates with element i + head_dim / 2


class Toy(Llama):
    config_class = ToyConfig


@pytest.fixture(autouse=True)
def toy_family():
    models.register("toyllama", Toy)  # the one line a new family needs
    yield
    del models.FAMILIES["toyllama"]


def renamed(source: Path, target: Path, architecture: str) -> Path:
    """`source` with its architecture (and the metadata keys under it) renamed; tensors as they are."""
    reader = gguf.GGUFReader(source)
    old = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(target), architecture)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        name = architecture + field.name[len(old):] if field.name.startswith(old + ".") else field.name
        writer.add_key_value(name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return target


def test_the_toy_family_computes_its_reference(tmp_path):
    """transformers' Llama rotates split halves; given the file's q/k rows as they are (no un-permuting, which
    its GGUF loader does for llama files), it is the toy family's reference."""
    transformers = pytest.importorskip("transformers")
    path = write_tiny_llama(tmp_path / "toy.gguf", Q.F32, architecture="toyllama", tied=False)
    file = GGUFFile(path)
    config = ToyConfig.from_gguf(file.metadata)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, max_position_embeddings=config.context_length,
        tie_word_embeddings=False)).eval()
    ours_to_theirs = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
                      "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                      "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                      "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                      "ffn_down": "mlp.down_proj"}
    state = {}
    for name, info in file.tensors.items():
        parts = name.removesuffix(".weight").split(".")
        key = (f"model.layers.{parts[1]}.{ours_to_theirs[parts[2]]}" if parts[0] == "blk"
               else ours_to_theirs[parts[0]])
        state[key + ".weight"] = torch.from_numpy(file.read(name).data.view(np.float32).reshape(info.shape).copy())
    reference.load_state_dict(state, strict=False)

    tokens = [3, 17, 200, 45, 9, 100, 7, 300, 511, 0]
    toy = load_span(file)
    ours = toy.head(toy.forward_span(toy.embed(tokens), toy.new_cache(len(tokens)), 0))
    with torch.no_grad():
        theirs = reference(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())

    as_llama = load_span(GGUFFile(write_tiny_llama(tmp_path / "llama.gguf", Q.F32, tied=False)))
    adjacent = as_llama.head(as_llama.forward_span(as_llama.embed(tokens), as_llama.new_cache(len(tokens)), 0))
    assert not torch.allclose(adjacent, ours, atol=1e-3), "the pairing variant changed nothing"


@pytest.mark.slow
def test_the_toy_family_runs_through_a_two_node_swarm(bundled_model, tmp_path):
    path = renamed(bundled_model, tmp_path / "toy-smollm2.gguf", "toyllama")
    whole = LocalEngine.load(path)
    assert isinstance(whole.model, Toy)
    prompt = whole.tokenizer.encode(whole.tokenizer.render_chat([{"role": "user", "content": "Name a colour."}]))
    expected = greedy_tokens(whole, prompt, 16)
    assert expected != greedy_tokens(LocalEngine.load(bundled_model), prompt, 16), "the toy family ran as plain Llama"

    nodes = [NodeService(tmp_path / f"node-{i}") for i in range(2)]
    servers = [start_server(node, "127.0.0.1", 0, None, lambda fingerprint: False) for node in nodes]
    gateway = Gateway.start(path, [f"127.0.0.1:{port}" for _, port in servers], identity=None, even_split=True,
                            progress=False)
    try:
        assert len(gateway.route) == 2
        assert greedy_tokens(gateway, prompt, 16) == expected
    finally:
        gateway.close()
        for (server, _), node in zip(servers, nodes, strict=True):
            server.stop(grace=0)
            node.close()
