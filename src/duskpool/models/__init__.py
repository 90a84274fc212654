"""Model families; each reads like its paper. `load_model` picks the family from the GGUF metadata."""

from duskpool.models.cache import ContextOverflowError, KVCache
from duskpool.models.llama import Llama, LlamaConfig
from duskpool.weights.gguf import GGUFFile


def load_model(file: GGUFFile, layers: range | None = None, embed: bool = True, head: bool = True) -> Llama:
    """The given span of layers (all by default), plus the embedding and head when asked for."""
    return Llama.from_gguf(file, layers, embed=embed, head=head)


__all__ = ["ContextOverflowError", "KVCache", "Llama", "LlamaConfig", "load_model"]
