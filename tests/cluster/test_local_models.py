"""`duskpool node --models DIR`: a node that has the model file reads its span from it. Nothing is streamed, and the
route gives the single-process tokens."""

import os
import re
import subprocess
import sys
import threading

import pytest
import torch

from duskpool.cluster.gateway import Gateway
from duskpool.engine.runner import LocalEngine
from duskpool.security import local_pool
from tests.conftest import Q, write_tiny_llama


def greedy(engine, prompt: list[int], n: int) -> list[int]:
    session = engine.open_session(len(prompt) + n)
    try:
        tokens = [int(torch.argmax(session.forward(prompt, 0)))]
        for i in range(n - 1):
            tokens.append(int(torch.argmax(session.forward(tokens[-1:], len(prompt) + i))))
        return tokens
    finally:
        session.close()


@pytest.fixture
def model_dir(tmp_path, bundled_model):
    """A folder of the node's own models, as Ollama's or LM Studio's: the bundled model and another one."""
    models = tmp_path / "models"
    models.mkdir()
    (models / bundled_model.name).symlink_to(bundled_model)
    write_tiny_llama(models / "other.gguf", Q.Q8_0, dim=64, ffn=128, vocab=64)
    return models


def start_node(models, identity_dir, cache) -> tuple[subprocess.Popen, str, list[str]]:
    process = subprocess.Popen([sys.executable, "-m", "duskpool.cli.main", "node", "--host", "127.0.0.1", "--port", "0",
                                "--no-announce", "--lend", "always", "--cache-dir", str(cache), "--models", str(models),
                                "--identity", str(identity_dir), "--exit-with", str(os.getpid())],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = re.search(r"listening on (\S+)", process.stdout.readline()).group(1)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
    return process, address, log


def test_a_node_with_the_model_file_reads_its_span_from_disk(model_dir, bundled_model, tmp_path):
    model = bundled_model
    prompt = [1, 5, 9, 13]
    expected = greedy(LocalEngine.load(model), prompt, 8)
    with local_pool(1, root=tmp_path / "pool", address=None) as pool:
        process, address, log = start_node(model_dir, pool.node_dirs[0], tmp_path / "cache")
        try:
            gateway = Gateway.start(model, [address], identity=pool.gateway, context_length=64, sessions=1,
                                    progress=False)
            try:
                assert gateway.weight_bytes_sent == 0
                assert greedy(gateway, prompt, 8) == expected
            finally:
                gateway.close()
        finally:
            process.terminate()
            process.wait(10)
    served = next(line for line in log if "serving layers" in line)
    assert "0.0 MB received" in served and "read from this machine" in served


def test_a_models_dir_that_does_not_exist_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "-m", "duskpool.cli.main", "node", "--port", "0", "--no-announce",
                           "--models", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--models" in done.stderr and "no such directory" in done.stderr
