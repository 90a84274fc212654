"""Real models' config.json (as their Hugging Face repos have them, transformers 4.x's form) read as the GGUF keys the
families take, and the errors a folder gives. The tiny models of tests/models/test_folders.py cover the tensors."""

import json
from pathlib import Path

import numpy as np
import pytest

from duskpool.models.gemma3 import Gemma3Config
from duskpool.models.llama import LlamaConfig
from duskpool.weights.folder import DEFAULTS, ModelFolder, metadata_from_config
from duskpool.weights.gguf import ModelFileError

LLAMA_32_1B = {  # meta-llama/Llama-3.2-1B-Instruct
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256}
GEMMA_3_4B_TEXT = {  # google/gemma-3-4b-it's text_config: only what differs from Gemma3TextConfig's defaults
    "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}


def test_llama_3_2_reads_as_its_gguf_does():
    config = LlamaConfig.from_gguf(metadata_from_config(LLAMA_32_1B, "llama"))
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim, config.ffn_dim) == (
        2048, 16, 32, 8, 64, 8192)
    assert (config.rope_theta, config.rope_llama3, config.norm_eps) == (500000.0, (32.0, 1.0, 4.0, 8192), 1e-5)
    assert (config.vocab_size, config.context_length, config.sliding_window) == (128256, 131072, None)


def test_gemma_3_4b_takes_transformers_defaults_for_what_its_config_leaves_out():
    config = Gemma3Config.from_gguf(metadata_from_config(DEFAULTS["gemma3"] | GEMMA_3_4B_TEXT, "gemma3"))
    assert (config.n_heads, config.n_kv_heads, config.head_dim, config.attention_scale) == (8, 4, 256, 256 ** -0.5)
    local, full = config.layer(0), config.layer(5)
    assert (local.sliding_window, local.rope_theta, local.rope_linear_factor) == (1024, 10000.0, 1.0)
    assert (full.sliding_window, full.rope_theta, full.rope_linear_factor) == (None, 1e6, 8.0)


def folder(tmp_path: Path, config: dict, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A folder of `config` and one safetensors file holding `tensors` (name -> dtype, shape) of zeros."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = int(np.prod(shape)) * {"BF16": 2, "F8_E4M3": 1}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(offset))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_multimodal_gemma_3_folder_is_read_as_its_text_model(tmp_path):
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "text_config": GEMMA_3_4B_TEXT | {"num_hidden_layers": 1}, "vision_config": {"hidden_size": 1152}}
    path = folder(tmp_path, config, {"model.language_model.embed_tokens.weight": ("BF16", [8, 2560]),
                                     "model.language_model.layers.0.pre_feedforward_layernorm.weight": ("BF16", [2560]),
                                     "model.vision_tower.encoder.layers.0.mlp.fc1.weight": ("BF16", [4, 4])})
    model = ModelFolder(path)
    assert model.architecture == "gemma3" and set(model.tensors) == {"token_embd.weight", "blk.0.ffn_norm.weight"}
    norm = model.read("blk.0.ffn_norm.weight")  # Gemma's 1 + w, as llama.cpp stores it
    assert norm.data.view(np.float32).tolist() == [1.0] * 2560


def test_a_tensor_of_a_type_duskpool_does_not_read_is_named(tmp_path):
    path = folder(tmp_path, LLAMA_32_1B, {"model.layers.0.mlp.up_proj.weight": ("F8_E4M3", [4, 4])})
    with pytest.raises(ModelFileError, match="model.layers.0.mlp.up_proj.weight is F8_E4M3"):
        ModelFolder(path)


def test_a_config_without_a_needed_field_says_which(tmp_path):
    config = {k: v for k, v in LLAMA_32_1B.items() if k != "hidden_size"}
    with pytest.raises(ModelFileError, match="lacks 'hidden_size'"):
        ModelFolder(folder(tmp_path, config, {"model.norm.weight": ("BF16", [4])}))


def test_a_hugging_face_cache_snapshot_is_named_by_its_repo(tmp_path):
    snapshot = tmp_path / "models--meta-llama--Llama-3.2-1B-Instruct" / "snapshots" / "4e20de3"
    snapshot.mkdir(parents=True)
    assert ModelFolder(folder(snapshot, LLAMA_32_1B, {"model.norm.weight": ("BF16", [4])})).name == (
        "meta-llama/Llama-3.2-1B-Instruct")
