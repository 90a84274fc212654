"""`duskpool models` lists model folders (Hugging Face cache, LM Studio), and `--model` takes one."""

import shutil

import pytest

from duskpool.engine.generate import GenerationParams
from duskpool.engine.runner import LocalEngine
from tests.cli.test_main import run_cli
from tests.models.test_folders import hf_folder

pytestmark = pytest.mark.slow  # the folder's model is made by transformers


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home whose Hugging Face cache (HF_HOME) holds a tiny Llama folder at refs/main, and LM Studio a copy."""
    hub = tmp_path / "hf" / "hub" / "models--tiny--llama-bf16"
    hf_folder("llama", hub / "snapshots" / "abc123")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    shutil.copytree(hub / "snapshots" / "abc123", tmp_path / ".lmstudio" / "models" / "tiny" / "llama-copy")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("OLLAMA_MODELS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "LMSTUDIO_MODELS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_models_lists_the_folders_hugging_face_and_lm_studio_keep(capsys, home):
    code, out, _ = run_cli(capsys, "models")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert code == 0
    assert "huggingface" in rows["hf.co/tiny/llama-bf16"]
    assert rows["hf.co/tiny/llama-bf16"].endswith("models--tiny--llama-bf16/snapshots/abc123")
    assert "lmstudio" in rows["tiny/llama-copy"]


def test_run_takes_a_listed_folder_by_its_name(capsys, home):
    code, out, err = run_cli(capsys, "run", "--model", "hf.co/tiny/llama-bf16", "--raw", "--max-tokens", "8",
                             "Tide pools")
    assert code == 0, err
    assert "models--tiny--llama-bf16/snapshots/abc123" in err  # what it loaded
    engine = LocalEngine.load(home / "hf/hub/models--tiny--llama-bf16/snapshots/abc123")
    expected = "".join(engine.generate(engine.tokenizer.encode("Tide pools"), GenerationParams(max_tokens=8)))
    assert expected and out.strip() == expected.strip()


def test_a_folder_path_of_an_unsupported_architecture_is_one_clear_error(capsys, home, tmp_path):
    folder = tmp_path / "phi"
    shutil.copytree(home / ".lmstudio" / "models" / "tiny" / "llama-copy", folder)
    config = (folder / "config.json").read_text().replace('"model_type": "llama"', '"model_type": "phi3"')
    (folder / "config.json").write_text(config)
    code, _, err = run_cli(capsys, "run", "--model", str(folder), "hi")
    assert code == 2 and "model architecture 'phi3' (config.json model_type) is not supported" in err
    assert "Traceback" not in err
