"""How a span is computed: one package per backend, each the `Ops` of models/base.py plus its machine's
name, device, speed probe and thread setting. Adding a backend is adding a package and a line here."""

import ctypes
import ctypes.util
import functools
import importlib
import importlib.util
import platform
import sys
from collections.abc import Callable
from types import ModuleType

from duskpool.models import ModelFile, ModelSpec, SpanModel, describe, load_model

BACKENDS = {"cpu": "duskpool.backends.cpu", "mlx": "duskpool.backends.mlx"}
DEFAULT = "cpu"


def backend(name: str = DEFAULT) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def pick(name: str = "auto") -> str:
    """The backend `--backend NAME` means here: "auto" is MLX on Apple silicon and wherever MLX has a GPU (its
    CUDA build), the CPU backend otherwise; "mlx" fails with what to install when MLX is not there."""
    if name == "auto":
        if importlib.util.find_spec("mlx") is None:
            return "cpu"
        if sys.platform == "darwin" and platform.machine() == "arm64":
            return "mlx"
        try:
            return "mlx" if backend("mlx").available() else "cpu"
        except ImportError:  # an MLX wheel without its native part for this machine
            return "cpu"
    if name == "mlx" and importlib.util.find_spec("mlx") is None:
        raise ValueError("backend 'mlx' needs MLX: pip install 'duskpool[mlx]' (CPU) or 'duskpool[cuda]' (NVIDIA)")
    backend(name)  # an unknown name fails here, with the known ones
    return name


def load_span(file: ModelFile, layers: range | None = None, embed: bool = True, head: bool = True,
              progress: bool = False, backend_name: str = DEFAULT) -> SpanModel:
    """Layers `layers` of the model in `file` (all by default), with its embedding and/or head, ready to run."""
    model = load_model(file, backend(backend_name), layers, embed=embed, head=head, progress=progress)
    return_freed_memory()
    return model


def return_freed_memory() -> None:
    """Hand the heap that loading freed (read buffers, conversions) back to the OS. glibc keeps freed blocks below
    its mmap threshold for reuse, which left a node's RSS ~20% above its weights + KV after a load; other C
    libraries (macOS's) return them themselves."""
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig); None elsewhere (musl has none)."""
    libc = ctypes.util.find_library("c") if sys.platform == "linux" else None
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def describe_model(file: ModelFile, backend_name: str = DEFAULT) -> ModelSpec:
    return describe(file, backend(backend_name))
