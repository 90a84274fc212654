"""Model discovery: fixture homes laid out as Ollama, LM Studio and the Hugging Face cache lay them out."""

import hashlib
import json
from pathlib import Path

import pytest

from duskpool.weights.catalog import (
    BUNDLED_NAME,
    ModelEntry,
    find_models,
    format_models,
    format_size,
    quant_from_filename,
    resolve_model,
)
from duskpool.weights.gguf import ModelFileError

GGUF_BYTES = b"GGUF" + bytes(60)  # the magic is all find_models reads


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def ollama_blob(models: Path, data: bytes) -> tuple[str, Path]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return digest, write(models / "blobs" / digest.replace(":", "-"), data)


def ollama_pull(models: Path, name_path: str, weights: bytes, file_type: str = "Q4_K_M") -> Path:
    """What `ollama pull` leaves: a manifest naming a config blob, the model blob and template/params/license."""
    config, _ = ollama_blob(models, json.dumps({"model_format": "gguf", "model_family": "llama",
                                                "file_type": file_type}).encode())
    model, blob = ollama_blob(models, weights)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": model, "size": len(weights)}]
    for kind, text in (("template", "{{ .Prompt }}"), ("params", '{"stop": ["<|eot_id|>"]}'), ("license", "MIT")):
        digest, _ = ollama_blob(models, text.encode())
        layers.append({"mediaType": f"application/vnd.ollama.image.{kind}", "digest": digest, "size": len(text)})
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config},
                "layers": layers}
    write(models / "manifests" / name_path, json.dumps(manifest))
    return blob


def hf_download(hub: Path, repo: str, files: list[str], revision: str = "a" * 40) -> dict[str, Path]:
    """What huggingface_hub leaves: blobs/<sha>, snapshots/<rev>/<file> -> ../../blobs/<sha>, refs/main."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    snapshot_files = {}
    for file in files:
        data = GGUF_BYTES + file.encode()
        sha = hashlib.sha256(data).hexdigest()
        write(repo_dir / "blobs" / sha, data)
        link = repo_dir / "snapshots" / revision / file
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(Path(file).parts) + 1), "blobs", sha))
        snapshot_files[file] = link
    write(repo_dir / "refs" / "main", revision)
    return snapshot_files


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home with models from all three tools, and some files that are not models to list."""
    home = tmp_path / "home"
    ollama = home / ".ollama" / "models"
    ollama_pull(ollama, "registry.ollama.ai/library/llama3.2/3b", GGUF_BYTES + b"llama3.2:3b")
    ollama_pull(ollama, "registry.ollama.ai/library/qwen3/latest", GGUF_BYTES + b"qwen3", "Q8_0")
    ollama_pull(ollama, "registry.ollama.ai/someone/tiny/v1", GGUF_BYTES + b"someone")
    ollama_pull(ollama, "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF/Q4_K_M", GGUF_BYTES + b"hf via ollama")
    ollama_pull(ollama, "registry.ollama.ai/library/notgguf/latest", b"PK\x03\x04 safetensors, say")
    write(ollama / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest", "{not json")

    lms = home / ".lmstudio" / "models" / "lmstudio-community" / "Qwen2.5-0.5B-Instruct-GGUF"
    write(lms / "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", GGUF_BYTES)
    write(lms / "mmproj-model-f16.gguf", GGUF_BYTES)  # a vision projector, not a model
    write(lms / "Big-Q4_K_M-00001-of-00002.gguf", GGUF_BYTES)  # a split model: skipped
    write(lms / "README.md", "not a model")
    write(home / ".cache" / "lm-studio" / "models" / "TheBloke" / "Old-GGUF" / "old.Q4_0.gguf", GGUF_BYTES)

    hub = home / ".cache" / "huggingface" / "hub"
    hf_download(hub, "bartowski/SmolLM2-360M-Instruct-GGUF",
                ["SmolLM2-360M-Instruct-Q4_K_M.gguf", "SmolLM2-360M-Instruct-Q8_0.gguf", "model.gguf"])
    hf_download(hub, "unsloth/Qwen3-GGUF", ["Qwen3-4B-Q4_K_M.gguf", "Qwen3-8B-Q4_K_M.gguf", "BF16/Qwen3-4B-BF16.gguf"])
    return home


def by_name(entries: list[ModelEntry]) -> dict[str, ModelEntry]:
    return {e.name: e for e in entries}


def test_ollama_models_are_named_as_ollama_lists_them(home: Path):
    found = by_name(find_models(home, env={}))
    blobs = home / ".ollama" / "models" / "blobs"
    assert found["llama3.2:3b"].path == blobs / ("sha256-" + hashlib.sha256(GGUF_BYTES + b"llama3.2:3b").hexdigest())
    assert found["llama3.2:3b"].source == "ollama"
    assert found["llama3.2:3b"].size == len(GGUF_BYTES) + len(b"llama3.2:3b")
    assert found["llama3.2:3b"].quant == "Q4_K_M"  # from the config blob
    assert found["qwen3:latest"].quant == "Q8_0"
    assert "someone/tiny:v1" in found
    assert "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M" in found
    assert not [n for n in found if n.startswith(("notgguf", "broken"))], "non-GGUF and damaged manifests are skipped"


def test_lmstudio_models_are_named_by_their_path_under_the_models_folder(home: Path):
    found = {e.name: e for e in find_models(home, env={}) if e.source == "lmstudio"}
    new = home / ".lmstudio" / "models" / "lmstudio-community" / "Qwen2.5-0.5B-Instruct-GGUF"
    assert found == {
        "lmstudio-community/Qwen2.5-0.5B-Instruct-GGUF/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf":
            ModelEntry("lmstudio-community/Qwen2.5-0.5B-Instruct-GGUF/Qwen2.5-0.5B-Instruct-Q4_K_M.gguf",
                       new / "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", "lmstudio", len(GGUF_BYTES), "Q4_K_M"),
        "TheBloke/Old-GGUF/old.Q4_0.gguf":
            ModelEntry("TheBloke/Old-GGUF/old.Q4_0.gguf",
                       home / ".cache" / "lm-studio" / "models" / "TheBloke" / "Old-GGUF" / "old.Q4_0.gguf",
                       "lmstudio", len(GGUF_BYTES), "Q4_0"),
    }, "mmproj files, split parts and non-GGUF files are not listed"


def test_hf_cache_models_are_named_as_ollama_pulls_them(home: Path):
    found = {e.name: e for e in find_models(home, env={}) if e.source == "huggingface"}
    hub = home / ".cache" / "huggingface" / "hub"
    snapshot = hub / "models--bartowski--SmolLM2-360M-Instruct-GGUF" / "snapshots" / ("a" * 40)
    assert found["hf.co/bartowski/SmolLM2-360M-Instruct-GGUF:Q4_K_M"].path == (
        snapshot / "SmolLM2-360M-Instruct-Q4_K_M.gguf"), "the snapshot's name for the file, not the blob's"
    assert found["hf.co/bartowski/SmolLM2-360M-Instruct-GGUF:Q8_0"].size == len(GGUF_BYTES) + len(
        b"SmolLM2-360M-Instruct-Q8_0.gguf"), "the size is the blob's, through the snapshot symlink"
    # no quant in the file name, or two files sharing one: the file's path names it
    assert "hf.co/bartowski/SmolLM2-360M-Instruct-GGUF/model.gguf" in found
    assert {"hf.co/unsloth/Qwen3-GGUF/Qwen3-4B-Q4_K_M.gguf", "hf.co/unsloth/Qwen3-GGUF/Qwen3-8B-Q4_K_M.gguf",
            "hf.co/unsloth/Qwen3-GGUF:BF16"} < set(found)
    assert found["hf.co/unsloth/Qwen3-GGUF:BF16"].path.read_bytes().startswith(b"GGUF"), "a quant kept in a folder"
    assert len(found) == 6


def test_the_bundled_model_is_listed_last(home: Path, bundled_model: Path):
    entries = find_models(home, env={})
    assert entries[-1] == ModelEntry(BUNDLED_NAME, bundled_model, "bundled", bundled_model.stat().st_size, "Q4_1")
    assert [e.source for e in entries] == sorted((e.source for e in entries),
                                                 key=["ollama", "lmstudio", "huggingface", "bundled"].index)


def test_environment_variables_move_each_store(tmp_path: Path):
    home = tmp_path / "home"
    ollama_pull(tmp_path / "ollama", "registry.ollama.ai/library/moved/latest", GGUF_BYTES + b"moved")
    write(tmp_path / "lms" / "pub" / "repo" / "moved-Q4_0.gguf", GGUF_BYTES)
    write(tmp_path / "lmhome" / "models" / "pub" / "repo" / "pointed-Q4_0.gguf", GGUF_BYTES)
    write(home / ".lmstudio-home-pointer", str(tmp_path / "lmhome"))
    hf_download(tmp_path / "hfhome" / "hub", "org/viahome", ["viahome-Q4_0.gguf"])
    hf_download(tmp_path / "hubcache", "org/viacache", ["viacache-Q4_0.gguf"])
    env = {"OLLAMA_MODELS": str(tmp_path / "ollama"), "LMSTUDIO_MODELS": str(tmp_path / "lms"),
           "HF_HOME": str(tmp_path / "hfhome")}
    names = {e.name for e in find_models(home, env)}
    assert {"moved:latest", "pub/repo/moved-Q4_0.gguf", "pub/repo/pointed-Q4_0.gguf",
            "hf.co/org/viahome:Q4_0"} < names
    names = {e.name for e in find_models(home, env | {"HF_HUB_CACHE": str(tmp_path / "hubcache")})}
    assert "hf.co/org/viacache:Q4_0" in names and "hf.co/org/viahome:Q4_0" not in names, "HF_HUB_CACHE wins"


def test_resolve_model_accepts_every_listed_name(home: Path):
    entries = find_models(home, env={})
    assert len(entries) >= 12
    for entry in entries:
        assert resolve_model(entry.name, home, env={}) == entry.path, entry.name


def test_resolve_model_accepts_what_ollama_accepts(home: Path):
    qwen3 = resolve_model("qwen3:latest", home, env={})
    assert resolve_model("qwen3", home, env={}) == qwen3, "no tag means :latest"
    assert resolve_model("registry.ollama.ai/library/qwen3:latest", home, env={}) == qwen3
    assert resolve_model("library/QWEN3", home, env={}) == qwen3, "names match without regard to case"


def test_resolve_model_takes_paths_and_defaults_to_the_bundled_model(home: Path, bundled_model: Path):
    path = home / ".lmstudio" / "models" / "lmstudio-community" / "Qwen2.5-0.5B-Instruct-GGUF" / "README.md"
    assert resolve_model(str(path), home, env={}) == path, "a path is taken as given, whatever it holds"
    assert resolve_model(None, home, env={}) == bundled_model
    assert resolve_model(BUNDLED_NAME, home, env={}) == bundled_model


def test_an_unknown_name_says_which_names_are_close(home: Path):
    with pytest.raises(ModelFileError, match=r"no model named 'llama3\.2:1b'.*close names: llama3\.2:3b") as e:
        resolve_model("llama3.2:1b", home, env={})
    assert "duskpool models" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelFileError, match="no model named 'zzz' on this machine \\(`duskpool models`"):
        resolve_model("zzz", home, env={})
    with pytest.raises(ModelFileError, match="model file not found: .*missing.gguf"):
        resolve_model(str(home / "missing.gguf"), home, env={})
    with pytest.raises(ModelFileError, match="nor a file of that name.*close names: TheBloke/Old-GGUF/old.Q4_0.gguf"):
        resolve_model("TheBloke/Old-GGUF/old.Q4_1.gguf", home, env={})


def test_format_models_prints_a_table(home: Path):
    entries = [e for e in find_models(home, env={}) if e.name in ("llama3.2:3b", "TheBloke/Old-GGUF/old.Q4_0.gguf")]
    lines = format_models(entries, home).splitlines()
    assert lines[0].split() == ["NAME", "SOURCE", "SIZE", "PATH"]
    assert lines[1].split()[:4] == ["llama3.2:3b", "ollama", "75", "B"]
    assert lines[1].endswith("~/.ollama/models/blobs/sha256-" + hashlib.sha256(GGUF_BYTES + b"llama3.2:3b").hexdigest())
    assert lines[2].split()[1] == "lmstudio"
    assert lines[1].index("ollama") == lines[2].index("lmstudio") == lines[0].index("SOURCE"), "columns line up"
    assert "no models found" in format_models([])


def test_sizes_and_quants_read_as_users_know_them():
    assert [format_size(n) for n in (512, 98_362_432, 2_019_377_376, 40_000_000_000)] == [
        "512 B", "98 MB", "2.0 GB", "40 GB"]
    assert [quant_from_filename(n) for n in ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "qwen2.5-0.5b-instruct-q8_0.gguf",
                                             "SmolLM2-135M-Instruct.Q4_1.gguf", "x-IQ4_XS.gguf", "m-BF16.gguf",
                                             "model.gguf")] == ["Q4_K_M", "Q8_0", "Q4_1", "IQ4_XS", "BF16", None]
