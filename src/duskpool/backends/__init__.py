"""How a span is computed: one package per backend, each the `Ops` of models/base.py plus its machine's
name, device, speed probe and thread setting. Adding a backend is adding a package and a line here."""

import importlib
from types import ModuleType

from duskpool.models import ModelFile, ModelSpec, SpanModel, describe, load_model

BACKENDS = {"cpu": "duskpool.backends.cpu"}
DEFAULT = "cpu"


def backend(name: str = DEFAULT) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def load_span(file: ModelFile, layers: range | None = None, embed: bool = True, head: bool = True,
              progress: bool = False, backend_name: str = DEFAULT) -> SpanModel:
    """Layers `layers` of the model in `file` (all by default), with its embedding and/or head, ready to run."""
    return load_model(file, backend(backend_name), layers, embed=embed, head=head, progress=progress)


def describe_model(file: ModelFile, backend_name: str = DEFAULT) -> ModelSpec:
    return describe(file, backend(backend_name))
