"""Loading with progress: the same model, every byte counted once, one step per tensor."""

import pytest
import torch

from duskpool.backends import load_span
from duskpool.engine.generate import GenerationParams
from duskpool.engine.runner import LocalEngine
from duskpool.weights.gguf import GGUFFile
from duskpool.weights.progress import Progress
from tests.conftest import Q


def logits(model, tokens: list[int]) -> torch.Tensor:
    cache = model.new_cache(len(tokens))
    return model.head(model.forward_span(model.embed(tokens), cache, 0))


@pytest.mark.slow
def test_load_with_progress_gives_the_same_model(bundled_model, capsys):
    file = GGUFFile(bundled_model)
    tokens = [1, 504, 3458, 314, 253, 1345, 30, 2]
    plain = logits(load_span(file), tokens)
    reported = logits(load_span(file, progress=True), tokens)
    assert torch.equal(plain, reported), "loading with progress changed the model's logits"
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"duskpool: loading {bundled_model.name}: 96.6 MB to go"
    assert err[-1].startswith(f"duskpool: loading {bundled_model.name}: done, 96.6 MB in "), err


@pytest.mark.slow
def test_local_engine_load_with_progress_answers_the_same(bundled_model, capsys):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = GenerationParams(max_tokens=8)
    quiet = "".join(LocalEngine.load(bundled_model, 512).chat(messages, params))
    assert capsys.readouterr().err == "", "progress is off unless asked for"
    shown = "".join(LocalEngine.load(bundled_model, 512, progress=True).chat(messages, params))
    assert shown == quiet
    assert "done, 96.6 MB" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("layers, embed, head", [(None, True, True), (range(0, 1), True, False),
                                                 (range(1, 2), False, True), (range(1, 2), False, False)])
def test_every_byte_read_is_counted_once_per_tensor(tiny_llama, monkeypatch, capsys, tied, layers, embed, head):
    steps = []
    advance = Progress.advance
    monkeypatch.setattr(Progress, "advance", lambda bar, n: (steps.append(n), advance(bar, n)))
    file = GGUFFile(tiny_llama(Q.Q8_0, tied=tied))
    read = []
    original = GGUFFile.read
    monkeypatch.setattr(GGUFFile, "read", lambda f, name: (read.append(name), original(f, name))[1])
    load_span(file, layers, embed=embed, head=head, progress=True)
    assert len(steps) == len(read), "one progress step per tensor read"
    assert sum(steps) == sum(file.tensors[n].nbytes for n in read)
    err = capsys.readouterr().err.splitlines()
    span = "" if layers is None else f" layers [{layers.start}, {layers.stop})"
    assert err[-1].startswith(f"duskpool: loading {file.path.name}{span}: done, "), \
        f"the announced total differs from the bytes read: {err[-1]}"
