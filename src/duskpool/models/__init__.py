"""Model families, one file each, found by the GGUF's `general.architecture` (a model folder's config.json is
read as the same keys: weights/folder.py).

A family is a `Span` subclass (models/base.py) with a config class that has at least `n_layers`, `dim`,
`vocab_size`, `context_length`, `n_kv_heads` and `head_dim`, and that names its tensors (`tensors_for`).
Adding one is a file and one `register` line. Nothing above this package sees a family: it gets a
`SpanModel` and a `ModelSpec`.
"""

from pathlib import Path
from typing import Any, Protocol

from duskpool.models.base import ContextOverflowError, KVCache, ModelSpec, Ops, Span, SpanModel
from duskpool.models.bert import Bert
from duskpool.models.gemma3 import Gemma3
from duskpool.models.llama import Llama
from duskpool.models.nomic_bert import NomicBert
from duskpool.models.qwen2 import Qwen2
from duskpool.models.qwen3 import Qwen3
from duskpool.weights.affine import Affine
from duskpool.weights.gguf import ModelFileError, PackedTensor
from duskpool.weights.progress import Progress

FAMILIES: dict[str, type[Span]] = {}


def register(architecture: str, family: type[Span]) -> None:
    """Files whose `general.architecture` is `architecture` load as `family`."""
    FAMILIES[architecture] = family


register("llama", Llama)
register("mistral", Llama)
register("qwen2", Qwen2)
register("qwen3", Qwen3)
register("gemma3", Gemma3)
register("bert", Bert)
register("nomic-bert", NomicBert)


class ModelFile(Protocol):
    """A GGUF file, a model folder (weights.folder.ModelFolder), or a model's tensors as a node caches them
    (weights.store.StoredModel)."""

    path: Any
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> weights.gguf.TensorInfo

    def read(self, name: str) -> PackedTensor: ...


def family_of(metadata: dict[str, Any]) -> type[Span]:
    arch = metadata.get("general.architecture")
    if arch not in FAMILIES:
        raise ModelFileError(f"model architecture '{arch}' is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[arch]


def tensors_for(file: ModelFile, layers: range, embed: bool, head: bool) -> list[str]:
    """The tensors a span of `layers` (and the embedding and/or head) reads: what a node is sent."""
    family = family_of(file.metadata)
    return family.tensors_for(family.config_from_gguf(file.metadata), layers, embed, head, file.tensors)


def describe(file: ModelFile, ops: Ops) -> ModelSpec:
    """The model as the layers above see it, without reading a weight."""
    family = family_of(file.metadata)
    config = family.config_from_gguf(file.metadata)

    def nbytes(names: list[str]) -> int:
        return sum(file.tensors[n].nbytes for n in names if n in file.tensors)

    layer_bytes = max((nbytes(family.tensors_for(config, range(i, i + 1), False, False, ()))
                       for i in range(config.n_layers)), default=0)
    name = getattr(file, "name", None) or Path(str(file.path)).name  # a folder names itself (weights/folder.py)
    return ModelSpec(name=name, architecture=file.metadata["general.architecture"],
                     n_layers=config.n_layers, dim=config.dim, vocab_size=config.vocab_size,
                     context_length=config.context_length,
                     kv_bytes_per_token=2 * config.n_kv_heads * config.head_dim * ops.KV_VALUE_BYTES,
                     layer_bytes=layer_bytes,
                     edge_bytes=nbytes(family.tensors_for(config, range(0), True, True, file.tensors)))


def load_model(file: ModelFile, ops: Ops, layers: range | None = None, embed: bool = True, head: bool = True,
               progress: bool = False) -> SpanModel:
    """The given span of layers (all by default), plus the embedding and head when asked for, computed by
    `ops` (a backend). `progress`: report the bytes read on stderr (a bar on a terminal, lines otherwise)."""
    family = family_of(file.metadata)
    config = family.config_from_gguf(file.metadata)
    layers = range(config.n_layers) if layers is None else layers
    if not (0 <= layers.start <= layers.stop <= config.n_layers and layers.step == 1):
        raise ValueError(f"layers {layers} are not a span of this model's {config.n_layers} layers")
    names = family.tensors_for(config, layers, embed, head, file.tensors)
    for name in names:  # every problem with the file before a byte of it is read
        if name not in file.tensors:
            raise ModelFileError(f"{file.path} lacks tensor {name}")
        qtype = file.tensors[name].qtype
        if qtype not in ops.SUPPORTED_TYPES and not isinstance(qtype, Affine):  # every backend takes MLX's
            raise ModelFileError(f"{file.path}: tensor {name} has quant type {qtype.name}, which duskpool does "
                                 f"not support (supported: {', '.join(t.name for t in ops.SUPPORTED_TYPES)})")
    span = "" if len(layers) == config.n_layers else f" layers [{layers.start}, {layers.stop})"
    total = sum(file.tensors[n].nbytes for n in names)
    with Progress(f"loading {Path(str(file.path)).name}{span}", total, enabled=progress) as bar:
        weights = {}
        for name in names:  # one step per tensor, nothing per byte
            weights[name] = file.read(name)
            bar.advance(file.tensors[name].nbytes)
    return family(describe(file, ops), config, layers, weights, ops, embed, head)


__all__ = ["FAMILIES", "ContextOverflowError", "KVCache", "ModelFile", "ModelSpec", "Ops", "SpanModel", "describe",
           "family_of", "load_model", "register", "tensors_for"]
