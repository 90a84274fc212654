"""Model families; each reads like its paper. `load_model` picks the family from the GGUF metadata."""

from pathlib import Path

from duskpool.models.cache import ContextOverflowError, KVCache
from duskpool.models.llama import Llama, LlamaConfig
from duskpool.weights import names
from duskpool.weights.gguf import GGUFFile
from duskpool.weights.progress import Progress


def load_model(file: GGUFFile, layers: range | None = None, embed: bool = True, head: bool = True,
               progress: bool = False) -> Llama:
    """The given span of layers (all by default), plus the embedding and head when asked for.

    `progress`: report the bytes read on stderr (weights.progress: a bar on a terminal, lines otherwise)."""
    if not progress:
        return Llama.from_gguf(file, layers, embed=embed, head=head)
    n_layers = LlamaConfig.from_gguf(file.metadata).n_layers
    layers = range(n_layers) if layers is None else layers
    span = "" if len(layers) == n_layers else f" layers [{layers.start}, {layers.stop})"
    total = sum(file.tensors[n].nbytes for n in _tensors_read(file, layers, embed, head) if n in file.tensors)
    with Progress(f"loading {Path(str(file.path)).name}{span}", total) as bar:
        return Llama.from_gguf(_Counted(file, bar), layers, embed=embed, head=head)


def _tensors_read(file: GGUFFile, layers: range, embed: bool, head: bool) -> set[str]:
    """What Llama.from_gguf reads for this span (tests check the two agree)."""
    wanted = {n for i in layers for n in names.llama_block(i).values()}
    if embed or (head and names.OUTPUT not in file.tensors):
        wanted.add(names.TOKEN_EMBEDDING)
    if head:
        wanted |= {names.OUTPUT_NORM} | ({names.OUTPUT} & file.tensors.keys())
    return wanted | ({names.ROPE_FREQS} & file.tensors.keys())


class _Counted:
    """`file`, whose reads advance `bar` by each tensor's size: one step per tensor, nothing per byte."""

    def __init__(self, file: GGUFFile, bar: Progress):
        self.path, self.metadata, self.tensors = file.path, file.metadata, file.tensors
        self._file, self._bar = file, bar

    def read(self, name: str):
        tensor = self._file.read(name)
        self._bar.advance(self.tensors[name].nbytes)
        return tensor


__all__ = ["ContextOverflowError", "KVCache", "Llama", "LlamaConfig", "load_model"]
