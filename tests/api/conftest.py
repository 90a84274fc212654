"""A live HTTP server (real uvicorn, real sockets) on a 3-node local swarm, shared by the API tests; and a
tiny random-weight model whose chat template takes tools, served in-process."""

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import uvicorn

from duskpool.api.server import create_app
from duskpool.api.service import Service
from duskpool.cluster.gateway import Gateway
from duskpool.cluster.swarm import LocalSwarm
from duskpool.engine.runner import LocalEngine
from duskpool.weights.catalog import BUNDLED_NAME
from tests.conftest import write_tiny_llama

TOOL_MODEL = "tiny-tools"


@contextmanager
def live_server(service: Service, **app_kw) -> Iterator[str]:
    """Serve `service` on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(service, **app_kw), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="package")
def swarm(tmp_path_factory):
    with LocalSwarm(3, cache_root=tmp_path_factory.mktemp("swarm")) as swarm:
        yield swarm


@pytest.fixture(scope="package")
def gateway(swarm, bundled_model):
    gateway = Gateway.start(bundled_model, swarm.addresses, identity=swarm.gateway_identity, even_split=True,
                            progress=False)
    yield gateway
    gateway.close()


@pytest.fixture(scope="package")
def service(gateway, bundled_model):
    service = Service(gateway, BUNDLED_NAME, bundled_model)
    yield service
    service.close()


@pytest.fixture(scope="package")
def base_url(service):
    with live_server(service) as url:
        yield url


# --- a tiny random-weight model whose chat template takes tools --------------------------------------
# Qwen 2.5's template (tools in the system turn, calls in <tool_call> tags, results in <tool_response> tags),
# its default system prompt shortened.
TOOL_TEMPLATE = (Path(__file__).parent / "qwen2.5-tools.jinja").read_text()
CONTROL, USER_DEFINED = 3, 4
SPECIAL = [("<|endoftext|>", CONTROL), ("<|im_start|>", CONTROL), ("<|im_end|>", CONTROL),
           ("<tool_call>", USER_DEFINED), ("</tool_call>", USER_DEFINED),
           ("<tool_response>", USER_DEFINED), ("</tool_response>", USER_DEFINED)]


def byte_vocabulary() -> list[str]:
    """The 256 single bytes, spelled in GPT-2's byte alphabet (a byte-level BPE with no merges)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def learn_merges(corpus: str, n: int) -> list[tuple[str, str]]:
    """Byte-level BPE merges learned from `corpus` (at most n, most frequent pair first), so that a prompt
    like the corpus takes a few hundred tokens rather than one per byte."""
    alphabet = byte_vocabulary()
    words = Counter(tuple(alphabet[b] for b in w.encode()) for w in re.findall(r" ?\w+| ?[^\s\w]+|\s+", corpus))
    merges: list[tuple[str, str]] = []
    for _ in range(n):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append((a, b))
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


CORPUS = (TOOL_TEMPLATE + ' {"type": "function", "function": {"name": "get_weather", "description": "The weather '
          'forecast for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": '
          '["Paris", "Tokyo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", '
          '"days"]}}} What will the weather be in Paris?')


@dataclass(frozen=True)
class Vocabulary:
    """A byte-level BPE vocabulary as a GGUF file stores it."""
    tokens: list[str]
    types: list[int]
    merges: list[tuple[str, str]]


def bpe_vocabulary(corpus: str, n_merges: int, size: int = 0) -> Vocabulary:
    """The 256 bytes, ChatML's and the tool tags' special tokens, and merges learned from `corpus`; padded to
    `size` tokens with ones no merge reaches (a real vocabulary's size, for what its embedding and head cost)."""
    tokens = byte_vocabulary() + [t for t, _ in SPECIAL]
    types = [1] * 256 + [k for _, k in SPECIAL]
    merges = [(a, b) for a, b in learn_merges(corpus, n_merges) if a + b not in tokens]
    tokens += list(dict.fromkeys(a + b for a, b in merges))
    tokens += [f"<unused{i}>" for i in range(size - len(tokens))]
    types += [1] * (len(tokens) - len(types))
    return Vocabulary(tokens, types, merges)


def with_vocabulary(bare: Path, path: Path, vocabulary: Vocabulary, pre: str, template: str | None = None,
                    context_length: int | None = None) -> Path:
    """`bare` (a GGUF file without a tokenizer) copied to `path` with `vocabulary` (pre-tokenizer `pre`), and the
    chat template and context length when given."""
    reader = gguf.GGUFReader(bare)
    architecture = reader.fields["general.architecture"].contents()
    replaced = {"general.architecture"} | ({f"{architecture}.context_length"} if context_length else set())
    writer = gguf.GGUFWriter(str(path), architecture)
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name not in replaced:
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if len(field.types) > 1 else None)
    if context_length:
        writer.add_context_length(context_length)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    writer.add_token_merges([f"{a} {b}" for a, b in vocabulary.merges])
    writer.add_bos_token_id(vocabulary.tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(vocabulary.tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    if template is not None:
        writer.add_chat_template(template)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    return path


def write_tiny_chat_llama(path: Path, template: str | None = TOOL_TEMPLATE, seed: int = 0, layers: int = 2) -> Path:
    """A random-weight tiny Llama (float32) with a byte-level BPE vocabulary, ChatML's control tokens and, when
    given, a chat template: a real model file, only its words are noise."""
    vocabulary = bpe_vocabulary(CORPUS, 250)
    bare = write_tiny_llama(path.with_suffix(".bare.gguf"), gguf.GGMLQuantizationType.F32, layers=layers, dim=64,
                            heads=4, kv_heads=2, ffn=128, vocab=len(vocabulary.tokens), seed=seed)
    # a byte per token: a prompt with tools is ~500 tokens
    with_vocabulary(bare, path, vocabulary, "qwen2", template, context_length=2048)
    bare.unlink()
    return path


@pytest.fixture(scope="package")
def tool_model(tmp_path_factory) -> Path:
    return write_tiny_chat_llama(tmp_path_factory.mktemp("tiny-tools") / "tiny-tools.gguf")


@pytest.fixture(scope="package")
def tool_engine(tool_model) -> LocalEngine:
    return LocalEngine.load(tool_model)


@pytest.fixture(scope="package")
def tool_url(tool_engine, tool_model) -> Iterator[str]:
    service = Service(tool_engine, TOOL_MODEL, tool_model)
    with live_server(service) as url:
        yield url
    service.close()
