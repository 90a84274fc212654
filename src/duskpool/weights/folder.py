"""A Hugging Face model folder (config.json + *.safetensors), or one that mlx-lm wrote (4-bit, 8-bit...), read as
if it were a GGUF file: the same metadata keys, tensor names and layout llama.cpp's converter would have written.

The families read GGUF (models/); this is a second source of the same thing, so nothing above `weights` knows a
model came from a folder. Three of the converter's changes are made here, as each tensor is read:
- Llama and Mistral: llama.cpp permutes the q and k rows so each head's rotated pairs are adjacent
  (`convert_hf_to_gguf.py`, LlamaModel.permute); Hugging Face keeps them as halves. We permute them the same way,
  so Llama's "adjacent" RoPE stays right for both sources.
- Gemma 3: Hugging Face's RMSNorm multiplies by (1 + w) and stores w; llama.cpp stores 1 + w (float32).
- names: `model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`.
Everything else stays as stored: bf16 stays bf16, MLX's packed groups stay packed (weights/affine.py).
"""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from duskpool.weights.affine import Affine, bf16_floats
from duskpool.weights.gguf import GGUFFile, ModelFileError, PackedTensor, TensorInfo

Q = GGMLQuantizationType
DTYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}  # safetensors dtype -> the GGML type of the same bytes
INDEX = "model.safetensors.index.json"

# config.json model_type -> (GGUF architecture, whether llama.cpp permutes q/k); the multimodal Gemma 3's text model
# is read from its text_config
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False), "gemma3_text": ("gemma3", False), "gemma3": ("gemma3", False)}
# What transformers' config class assumes where a config.json leaves a field out (Gemma 3 4B/12B/27B's text_config
# gives only what differs from them)
DEFAULTS = {"gemma3": {"vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                       "rms_norm_eps": 1e-6, "rope_theta": 1e6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                       "rope_local_base_freq": 10000.0, "max_position_embeddings": 131072,
                       "sliding_window_pattern": 6}}
# where the text model's tensors live in a checkpoint, by the class that wrote it
PREFIXES = ("model.language_model.", "language_model.model.", "model.")
HEADS = ("lm_head", "language_model.lm_head")
TOP = {"embed_tokens": "token_embd", "norm": "output_norm"}
BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# Gemma 3 normalizes before and after each half of a block
GEMMA_BLOCK = {**BLOCK, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes are: the file and byte range of each array it is made of."""

    ranges: tuple[tuple[Path, int, int], ...]  # (file, offset, nbytes): one, or an MLX weight's codes/scales/biases
    qtype: Any  # as stored: GGMLQuantizationType | Affine
    shape: tuple[int, ...]  # (rows, cols) as computed with
    permute_heads: int = 0  # llama.cpp's q/k row permutation over this many heads
    plus_one: bool = False  # Gemma's norm: stored w, computed with 1 + w


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and bool(_shards(path))


def model_size(path: Path) -> int:
    """Bytes of a model file, or of a folder's weights."""
    return sum(p.stat().st_size for p in _shards(path)) if path.is_dir() else path.stat().st_size


def open_model(path: str | os.PathLike) -> "GGUFFile | ModelFolder":
    """A .gguf file or a model folder, by what `path` is."""
    path = Path(path)
    return ModelFolder(path) if path.is_dir() else GGUFFile(path)


def _shards(path: Path) -> list[Path]:
    """The safetensors files that hold the model: the index's, else model*.safetensors (not Mistral's duplicate
    `consolidated.safetensors`), else any."""
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text()).get("weight_map", {})
        return [path / name for name in sorted(set(weight_map.values()))]
    every = sorted(path.glob("*.safetensors"))
    return [p for p in every if p.name.startswith("model")] or every


def _header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's table (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(file, "rb") as f:
        size = f.read(8)
        if len(size) != 8:
            raise ModelFileError(f"{file} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", size)
        if length > 100 << 20:
            raise ModelFileError(f"{file} is not a safetensors file (its header claims {length} bytes)")
        try:
            table = json.loads(f.read(length))
        except ValueError:
            raise ModelFileError(f"{file} is not a safetensors file (its header is not JSON)") from None
    table.pop("__metadata__", None)
    return table, 8 + length


class ModelFolder:
    """A Hugging Face or MLX model folder with a GGUF file's interface: `metadata`, `tensors`, `read`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ModelFileError(f"{self.path} is not a model folder (it has no config.json)")
        shards = _shards(self.path)
        if not shards:
            raise ModelFileError(f"{self.path} has no .safetensors weights")
        config = json.loads((self.path / "config.json").read_text())
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ModelFileError(f"model architecture '{model_type}' (config.json model_type) is not supported "
                                 f"(supported: {', '.join(ARCHITECTURES)})")
        arch, self.permute_qk = ARCHITECTURES[model_type]
        text = config.get("text_config", config) if model_type == "gemma3" else config
        self.config = DEFAULTS.get(arch, {}) | text
        self.quantization = config.get("quantization")  # mlx-lm's: {"group_size": 64, "bits": 4, per-module...}
        if self.quantization and self.quantization.get("mode", "affine") != "affine":
            raise ModelFileError(f"{self.path}: MLX quantization mode '{self.quantization['mode']}' is not "
                                 "supported (only affine)")
        try:
            self.metadata = metadata_from_config(self.config, arch)
        except KeyError as e:
            raise ModelFileError(f"{self.path}: config.json lacks {e}") from None
        self.block = GEMMA_BLOCK if arch == "gemma3" else BLOCK
        self.stored: dict[str, Stored] = {}
        self._index(shards)
        self.tensors = {name: _info(name, s) for name, s in self.stored.items()}

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @property
    def name(self) -> str:
        """The repo a Hugging Face cache snapshot is of (`org/name`), else the folder's name."""
        repo = self.path.parent.parent.name
        if self.path.parent.name == "snapshots" and repo.startswith("models--"):
            return "/".join(repo.split("--")[1:])
        return self.path.name

    def _gguf_name(self, hf_name: str) -> tuple[str, str] | None:
        """`model.layers.3.mlp.up_proj` -> (`blk.3.ffn_up`, the HF module); None for a tensor no family reads."""
        if hf_name in HEADS:
            return "output", hf_name
        prefix = next((p for p in PREFIXES if hf_name.startswith(p)), None)
        if prefix is None:
            return None  # a vision tower, a projector...
        rest = hf_name[len(prefix):]
        if rest in TOP:
            return TOP[rest], hf_name
        if rest.startswith("layers."):
            _, index, module = rest.split(".", 2)
            if module in self.block:
                return f"blk.{index}.{self.block[module]}", hf_name
        return None

    def _index(self, shards: list[Path]) -> None:
        table: dict[str, tuple[Path, int, dict[str, Any]]] = {}  # every shard's: an MLX weight's parts may straddle
        for shard in shards:
            entries, data_start = _header(shard)
            table |= {key: (shard, data_start, entry) for key, entry in entries.items()}

        def where(key: str) -> tuple[Path, int, int]:
            shard, data_start, entry = table[key]
            begin, end = entry["data_offsets"]
            return shard, data_start + begin, end - begin

        for key, (shard, _, entry) in table.items():
            module, _, kind = key.rpartition(".")
            names = self._gguf_name(module)
            if names is None or kind not in ("weight", "bias"):
                continue  # an MLX weight's scales and biases (read with it), rotary_emb.inv_freq, a vision tower...
            ours, hf_module = names
            name, shape = f"{ours}.{kind}", tuple(entry["shape"])
            if entry["dtype"] == "U32" and f"{module}.scales" in table:
                affine = self._affine(hf_module, table[f"{module}.scales"][2])
                ranges = [where(key), where(f"{module}.scales"), where(f"{module}.biases")]
                qtype, shape = affine, (shape[0], shape[1] * 32 // affine.bits)
            elif entry["dtype"] in DTYPES:
                ranges, qtype = [where(key)], DTYPES[entry["dtype"]]
            else:
                raise ModelFileError(f"{shard}: tensor {key} is {entry['dtype']}, which duskpool does not read "
                                     f"(supported: {', '.join(DTYPES)} and MLX's packed U32)")
            heads = 0
            if self.permute_qk and ours.endswith(("attn_q", "attn_k")) and kind == "weight":
                heads = self._heads(ours.endswith("attn_k"))
            plus_one = self.architecture == "gemma3" and ours.endswith("norm")
            self.stored[name] = Stored(tuple(ranges), qtype, shape, heads, plus_one)

    def _affine(self, hf_module: str, scales: dict[str, Any]) -> Affine:
        if not self.quantization:
            raise ModelFileError(f"{self.path}: {hf_module} is packed but config.json has no 'quantization'")
        own = self.quantization.get(hf_module)
        q = own if isinstance(own, dict) else self.quantization
        if scales["dtype"] not in DTYPES:
            raise ModelFileError(f"{self.path}: {hf_module}.scales is {scales['dtype']}")
        return Affine(int(q["bits"]), int(q["group_size"]), DTYPES[scales["dtype"]])

    def _heads(self, kv: bool) -> int:
        heads = self.config["num_attention_heads"]
        return self.config.get("num_key_value_heads") or heads if kv else heads

    def read(self, name: str) -> PackedTensor:
        s = self.stored[name]
        parts = []
        for file, offset, nbytes in s.ranges:
            part = np.empty(nbytes, dtype=np.uint8)
            with open(file, "rb") as f:
                f.seek(offset)
                if f.readinto(part) != nbytes:
                    raise ModelFileError(f"{file} is truncated inside tensor {name}")
            parts.append(part)
        if s.plus_one:
            values = _floats(parts[0], s.qtype)
            return PackedTensor((values + 1).astype(np.float32).view(np.uint8), Q.F32, s.shape)
        if s.permute_heads:  # every array of the weight has a row per output: permuted alike
            parts = [_permute(p.reshape(s.shape[0], -1), s.permute_heads).reshape(-1) for p in parts]
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return PackedTensor(data, s.qtype, s.shape)

    def read_bytes(self, name: str) -> bytes:
        """A tensor's bytes as a node receives and caches them (after the changes above)."""
        return self.read(name).data.tobytes()


def _info(name: str, s: Stored) -> TensorInfo:
    """The tensor as `read` gives it: a Gemma norm becomes float32."""
    if s.plus_one:
        return TensorInfo(name, Q.F32, s.shape, 0, 4 * int(np.prod(s.shape)))
    return TensorInfo(name, s.qtype, s.shape, 0, sum(n for _, _, n in s.ranges))


def _floats(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.BF16:
        return bf16_floats(data.view(np.uint16))
    return data.view(np.float16 if qtype == Q.F16 else np.float32).astype(np.float32)


def _permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute over rows: each head's two rotated halves interleaved."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, -1).swapaxes(1, 2).reshape(n, -1)


def metadata_from_config(config: dict[str, Any], arch: str) -> dict[str, Any]:
    """config.json's fields under the GGUF keys the families read (llama.cpp's converter writes the same)."""
    c, m = config, {"general.architecture": arch}

    def put(key: str, value: Any) -> None:
        if value is not None:
            m[f"{arch}.{key}"] = value

    heads = c["num_attention_heads"]
    put("vocab_size", c["vocab_size"])
    put("embedding_length", c["hidden_size"])
    put("block_count", c["num_hidden_layers"])
    put("feed_forward_length", c["intermediate_size"])
    put("attention.head_count", heads)
    put("attention.head_count_kv", c.get("num_key_value_heads") or heads)
    put("attention.key_length", c.get("head_dim"))
    put("attention.value_length", c.get("head_dim"))
    put("attention.layer_norm_rms_epsilon", float(c.get("rms_norm_eps", 1e-6)))
    put("context_length", c.get("max_position_embeddings"))
    rope = _rope(c, arch)
    put("rope.freq_base", float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        put("rope.scaling.type", "linear")
        put("rope.scaling.factor", float(rope["factor"]))
    elif kind == "llama3":
        put("rope.scaling.type", "llama3")
        put("rope.scaling.factor", float(rope["factor"]))
        put("rope.scaling.low_freq_factor", float(rope.get("low_freq_factor", 1.0)))
        put("rope.scaling.high_freq_factor", float(rope.get("high_freq_factor", 4.0)))
        put("rope.scaling.original_context_length", int(rope.get("original_max_position_embeddings", 8192)))
    elif kind != "default":
        put("rope.scaling.type", kind)  # the family refuses it, naming it
    if arch == "llama" and (c.get("attention_bias") or c.get("mlp_bias")):
        raise ModelFileError("Llama with biases on its projections is not supported")
    if arch in ("qwen2", "qwen3") and c.get("use_sliding_window"):
        raise ModelFileError(f"{arch} with sliding-window layers (use_sliding_window) is not supported")
    if arch == "llama" and c.get("sliding_window"):  # Mistral's
        put("attention.sliding_window", c["sliding_window"])
    if arch == "gemma3":
        _gemma3(c, m)
    return m


def _rope(c: dict[str, Any], arch: str) -> dict[str, Any]:
    """The global layers' RoPE: transformers 5's rope_parameters (per layer kind for Gemma 3), else the older
    rope_theta + rope_scaling."""
    params = c.get("rope_parameters")
    if params:
        return params.get("full_attention", params)
    return {"rope_theta": c.get("rope_theta", 10000.0), **(c.get("rope_scaling") or {})}


def _gemma3(c: dict[str, Any], m: dict[str, Any]) -> None:
    """Gemma 3's per-layer choices are what models/gemma3.py assumes (as llama.cpp does); refuse one that is not."""
    layers, window = c["num_hidden_layers"], c.get("sliding_window")
    if window:
        m["gemma3.attention.sliding_window"] = window
    kinds = c.get("layer_types") or (["sliding_attention" if (i + 1) % c.get("sliding_window_pattern", 6) else
                                      "full_attention" for i in range(layers)])
    expected = ["full_attention" if i % 6 == 5 or not window else "sliding_attention" for i in range(layers)]
    if kinds != expected:
        raise ModelFileError("Gemma 3 whose layers do not alternate five local to one global is not supported")
    local = (c.get("rope_parameters") or {}).get("sliding_attention", {}).get(
        "rope_theta", c.get("rope_local_base_freq", 10000.0))
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    scalar = c["hidden_size"] / c["num_attention_heads"] if layers == 62 else head_dim
    if float(local) != 10000.0 or float(c.get("query_pre_attn_scalar", scalar)) != float(scalar):
        raise ModelFileError("Gemma 3 with a local RoPE base other than 10000 or an unusual query scale is not "
                             "supported")
    if c.get("final_logit_softcapping"):
        m["gemma3.final_logit_softcapping"] = c["final_logit_softcapping"]  # refused by the family, by name
    if c.get("attn_logit_softcapping"):
        raise ModelFileError("Gemma 3 with attention logit soft-capping is not supported")
