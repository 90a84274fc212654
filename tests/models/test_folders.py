"""Hugging Face and MLX model folders against transformers.

Each family's tiny random model (test_families.py) is saved as transformers saves it (bf16 safetensors, config.json,
one family sharded with an index) beside a tokenizer.json, and read back by transformers' own loader: ours, reading
the same folder, must give the same logits and the same 32 greedy tokens, in this process and through two nodes.
An MLX folder is made by mlx-lm itself (`mlx_lm.convert`), and, for the widths and shard layouts it is not asked
for, written as it writes one (mx.quantize's packed codes, scales and biases in the model's bf16, config.json's
"quantization"); its reference is transformers running the weights as MLX dequantizes them.
"""

import contextlib
import copy
import functools
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from duskpool.cluster.gateway import Gateway
from duskpool.cluster.node import NodeService
from duskpool.cluster.transport import start_server
from duskpool.engine.runner import LocalEngine
from duskpool.weights.affine import Affine
from duskpool.weights.folder import ModelFolder
from duskpool.weights.gguf import ModelFileError
from tests.conftest import greedy_tokens
from tests.models.test_families import PROMPT, STEPS, agreement, families, run, their_run, tiny_model

pytestmark = pytest.mark.slow  # transformers is the reference
Q = GGMLQuantizationType
NEEDS_MLX = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="MLX is not installed")
TEXT = ("Tide pools form where the sea leaves water behind in hollows of rock. Crabs, anemones and small fish live "
        "there between tides, and each pool is a little world of its own. 0123456789 (x + y) * z != w? ") * 8
SPECIAL = ["<|begin|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.cache
def tokenizer_json() -> str:
    """A byte-level BPE of 512 tokens trained on TEXT, which puts <|begin|> before a text (as Llama 3's does)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 0)])
    return tokenizer.to_str()


def write_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text(tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|im_end|>",
        "chat_template": TEMPLATE}))


def hf_folder(name: str, path: Path, sharded: bool = False) -> Path:
    """The family's tiny model as transformers saves it, in bf16."""
    model = copy.deepcopy(tiny_model(name)).to(torch.bfloat16)
    model.save_pretrained(path, **({"max_shard_size": "300KB"} if sharded else {}))
    write_tokenizer(path)
    return path


def mlx_folder(name: str, path: Path, bits: int, group_size: int,
               shard_keys: int | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """The family's tiny model as mlx-lm's convert -q writes it (bf16, its matrices quantized); and the state dict
    of the values the packed weights stand for (dequantized in float32). `shard_keys`: that many arrays per file,
    in order, with an index, as mlx-lm shards a large model (a weight's codes, scales and biases may then be in
    two files)."""
    mx = pytest.importorskip("mlx.core")
    model = tiny_model(name)
    arrays, values = {}, {}
    for key, tensor in model.state_dict().items():
        weight = mx.array(tensor.numpy()).astype(mx.bfloat16)
        if tensor.ndim == 2:  # the embedding and every linear layer (mlx-lm's nn.quantize)
            packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
            module = key.removesuffix(".weight")
            arrays |= {key: packed, f"{module}.scales": scales, f"{module}.biases": biases}
            weight = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32),
                                   group_size=group_size, bits=bits)
        else:
            arrays[key] = weight
        values[key] = torch.from_numpy(np.array(weight.astype(mx.float32)))
    path.mkdir()
    keys = list(arrays)
    shards = [keys[i:i + (shard_keys or len(keys))] for i in range(0, len(keys), shard_keys or len(keys))]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if shard_keys else "model.safetensors"
        mx.save_safetensors(str(path / file), {k: arrays[k] for k in shard}, metadata={"format": "mlx"})
        weight_map |= dict.fromkeys(shard, file)
    if shard_keys:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = model.config.to_dict() | {"quantization": {"group_size": group_size, "bits": bits}}
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    return path, values


def reference_of(name: str, state: dict[str, torch.Tensor]):
    model = type(tiny_model(name))(tiny_model(name).config).eval()
    model.load_state_dict(state)
    return model


@contextlib.contextmanager
def two_nodes(root: Path) -> Iterator[list[str]]:
    """Two nodes in this process (plaintext), each with its own tensor store under `root`."""
    nodes = [NodeService(root / f"node-{i}") for i in range(2)]
    servers = [start_server(node, "127.0.0.1", 0, None, lambda fingerprint: False) for node in nodes]
    try:
        yield [f"127.0.0.1:{port}" for _, port in servers]
    finally:
        for (server, _), node in zip(servers, nodes, strict=True):
            server.stop(grace=0)
            node.close()


def swarm_tokens(path: Path, addresses: list[str]) -> tuple[list[int], int]:
    """The greedy tokens through a gateway that holds only the edges and two nodes the layers; and the bytes of
    weights it sent them."""
    gateway = Gateway.start(path, addresses, identity=None, prefix=0, suffix=0, even_split=True, progress=False)
    try:
        assert len(gateway.route) == 2
        return greedy_tokens(gateway, PROMPT, STEPS), gateway.weight_bytes_sent
    finally:
        gateway.close()


def assert_agrees(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    cosine, max_diff = agreement(ours, theirs)
    assert cosine >= 0.999, f"{what}: logits cosine {cosine:.6f} (max abs diff {max_diff:.2e})"
    # the same weights on both sides: what differs is float rounding
    assert max_diff <= 1e-3 * theirs.abs().max(), f"{what}: logits differ by {max_diff:.2e}"


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_a_hugging_face_folder_computes_what_transformers_computes_from_it(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    sharded = name == "qwen2"
    path = hf_folder(name, tmp_path / name, sharded)
    if sharded:
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    their_logits, their_tokens = their_run(theirs, PROMPT, STEPS)

    engine = LocalEngine.load(path)
    assert type(engine.model) is families()[name].cls
    projection = engine.model.blocks[0].attention.wqkv.parts[0]
    assert projection.qtype == Q.BF16 and projection.data.dtype == torch.uint8  # kept as stored: 2 bytes a weight
    our_logits, our_tokens = run([engine.model], PROMPT, STEPS)
    assert_agrees(our_logits, their_logits, name)
    assert our_tokens == their_tokens, f"{name}: greedy tokens differ"

    with two_nodes(tmp_path) as addresses:
        tokens, _ = swarm_tokens(path, addresses)
    assert tokens == their_tokens, f"{name}: the swarm's greedy tokens differ"


# 4 bits: Q4_1 on the CPU backend; the others: Q8_0 and a bias per group (Gemma's padding token has a zero row)
MLX_CASES = [("llama", 4, 64), ("qwen3", 4, 128), ("gemma3", 8, 64), ("qwen2", 3, 32)]


@NEEDS_MLX
@pytest.mark.parametrize("backend", ["cpu", "mlx"])
@pytest.mark.parametrize(("name", "bits", "group_size"), MLX_CASES, ids=lambda x: str(x))
def test_an_mlx_folder_computes_what_its_dequantized_weights_do(name, bits, group_size, backend, tmp_path):
    path, state = mlx_folder(name, tmp_path / name, bits, group_size)
    folder = ModelFolder(path)
    assert folder.tensors["blk.0.attn_q.weight"].qtype == Affine(bits, group_size, Q.BF16)
    their_logits, their_tokens = their_run(reference_of(name, state), PROMPT, STEPS)

    engine = LocalEngine.load(path, backend_name=backend)
    our_logits, our_tokens = run([engine.model], PROMPT, STEPS)
    assert_agrees(our_logits, their_logits, f"{name} {bits}-bit on {backend}")
    assert our_tokens == their_tokens, f"{name} {bits}-bit on {backend}: greedy tokens differ"
    if backend == "mlx":  # kept as the folder packs them: no conversion, the folder's own groups
        projection = engine.model.blocks[0].attention.wqkv.parts[0]
        assert (projection.bits, projection.group_size) == (bits, group_size)


@NEEDS_MLX
def test_an_mlx_folder_is_sent_to_nodes_and_cached_by_content(tmp_path):
    path, state = mlx_folder("llama", tmp_path / "llama", 4, 64, shard_keys=7)  # 7: shards cut weights apart
    assert len(list(path.glob("*.safetensors"))) > 2
    _, their_tokens = their_run(reference_of("llama", state), PROMPT, STEPS)
    with two_nodes(tmp_path) as addresses:
        tokens, sent = swarm_tokens(path, addresses)
    assert tokens == their_tokens
    assert sent >= sum(info.nbytes for name, info in ModelFolder(path).tensors.items() if name.startswith("blk."))
    with two_nodes(tmp_path) as addresses:  # the same stores, new nodes: every tensor is there already
        tokens, sent = swarm_tokens(path, addresses)
    assert (tokens, sent) == (their_tokens, 0)


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    """The state dict an MLX folder's packed weights stand for, as MLX dequantizes them (float32 scales)."""
    mx = pytest.importorskip("mlx.core")
    quantization = json.loads((path / "config.json").read_text())["quantization"]
    arrays = {}
    for file in path.glob("*.safetensors"):
        arrays |= mx.load(str(file))
    state = {}
    for key, array in arrays.items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and f"{module}.scales" in arrays:
            array = mx.dequantize(array, arrays[f"{module}.scales"].astype(mx.float32),
                                  arrays[f"{module}.biases"].astype(mx.float32),
                                  group_size=quantization["group_size"], bits=quantization["bits"])
        if not key.endswith((".scales", ".biases")):
            state[key] = torch.from_numpy(np.array(array.astype(mx.float32)))
    return state


@NEEDS_MLX
@pytest.mark.parametrize(("name", "bits"), [("llama", 4), ("gemma3", 4), ("qwen2", 8)])
def test_what_mlx_lm_convert_writes_computes_its_dequantized_weights_on_both_backends(name, bits, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm")
    source = hf_folder(name, tmp_path / "hf")
    path = tmp_path / "mlx"
    mlx_lm.convert(hf_path=str(source), mlx_path=str(path), quantize=True, q_group_size=64, q_bits=bits)
    assert json.loads((path / "config.json").read_text())["quantization"]["bits"] == bits
    state = dequantized(path)
    reference = reference_of(name, {**state, "lm_head.weight": state.get("lm_head.weight",
                                                                        state["model.embed_tokens.weight"])})
    their_logits, their_tokens = their_run(reference, PROMPT, STEPS)
    for backend in ("cpu", "mlx"):
        engine = LocalEngine.load(path, backend_name=backend)
        our_logits, our_tokens = run([engine.model], PROMPT, STEPS)
        assert_agrees(our_logits, their_logits, f"{name} {bits}-bit by mlx-lm on {backend}")
        assert our_tokens == their_tokens, f"{name} {bits}-bit by mlx-lm on {backend}: greedy tokens differ"
    assert engine.tokenizer.chat_template == TEMPLATE  # mlx-lm moves it to chat_template.jinja


def test_the_tokenizer_of_a_folder_is_transformers_own(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = hf_folder("qwen3", tmp_path / "qwen3")
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    ours = LocalEngine.load(path).tokenizer
    texts = ["Tide pools form where the sea leaves water.", "  (x+y) != 42?\n\nCrabs  live", "Ünïcödé 🌊 <|im_end|>"]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text), skip_special_tokens=True)
    messages = [{"role": "user", "content": "Name a crab."}]
    assert ours.render_chat(messages) == theirs.apply_chat_template(messages, tokenize=False,
                                                                    add_generation_prompt=True)
    chat = ours.render_chat(messages)  # it writes <|begin|> itself: the encoder adds none before it
    assert ours.encode(chat) == theirs.encode(chat, add_special_tokens=False) and ours.encode(chat)[:2] == [0, 1]
    assert ours.stop_ids == {theirs.convert_tokens_to_ids("<|im_end|>")}


def test_a_folder_of_an_unsupported_architecture_says_which(tmp_path):
    path = hf_folder("llama", tmp_path / "phi")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "phi3"}))
    with pytest.raises(ModelFileError, match="'phi3'.*not supported"):
        LocalEngine.load(path)
