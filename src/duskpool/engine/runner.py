"""Engines: what the CLI and the API drive. `LocalEngine` runs the whole model in this process; the
cluster's gateway is the same interface over a route of nodes."""

import threading
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch

from duskpool import backends
from duskpool.engine.generate import PREFILL_CHUNK, GenerationParams, GenerationStats, Piece, check_prompt, generate
from duskpool.engine.grammar import Vocabulary
from duskpool.engine.speculative import Verifier
from duskpool.engine.tokenizer import Tokenizer
from duskpool.models import ContextOverflowError, ModelSpec, SpanModel
from duskpool.weights.folder import ModelFolder, open_model
from duskpool.weights.gguf import GGUFFile, ModelFileError

_counting = threading.Lock()
DEFAULT_CONTEXT = 4096  # a session's KV cache is sized for this unless the model's own context is shorter


def load_tokenizer(file: GGUFFile | ModelFolder) -> Tokenizer:
    try:
        if isinstance(file, ModelFolder):
            return Tokenizer.from_folder(file.path)
        return Tokenizer.from_gguf_metadata(file.metadata)
    except (ValueError, OSError) as e:
        raise ModelFileError(f"{file.path}: {e}") from None


class Session(Protocol):
    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        """Run tokens at positions start.. through the model; logits [vocab] of the last one."""

    def close(self) -> None:
        """Free the session's KV caches wherever they are."""


class HiddenSession(Session, Protocol):
    """A session that can also give the final hidden states (what embeddings pool) instead of logits."""

    def final_hidden(self, tokens: list[int], start: int) -> torch.Tensor:
        """Run tokens at positions start.. through the model; the hidden states [T, dim] after its final norm,
        before the LM head."""


class EmbeddingsUnsupported(NotImplementedError):
    """The engine's sessions cannot give final hidden states."""


class CannotGenerate(ValueError):
    """The model is an encoder (BERT): it embeds, it has no next token to predict."""


def drafting_pays(generating: int, stages: int) -> bool:
    """Whether prompt-lookup drafts (speculative.py) pay with `generating` generations at once on `stages` stages
    that compute in turn (the gateway and each node of its route; 1 in one process). A verify pass of 1 + 3 rows
    costs a stage about 1.7 times one row: stages idle most of the time hide that, busy ones make every other
    generation wait for it. Measured on a 4-stage ring (bundled model, a core set per process, 128 greedy tokens,
    drafting on vs off): 1 generation +36%, 2 +14%, 3 -16%, 4 -13%; so while at most half the stages are busy."""
    return generating <= max(1, stages // 2)


class Engine:
    tokenizer: Tokenizer
    context_length: int
    spec: ModelSpec  # the model, as the API describes it
    backend: str  # what computes the layers held in this process
    speculative: bool = True  # draft by prompt lookup where the context repeats (engine/speculative.py)
    generating: int = 0  # generations running now
    causal: bool = True  # False: an encoder, which only embeds (SpanModel.causal)
    pooling: str = "mean"  # how an embedding pools the final hidden states (SpanModel.pooling)

    def open_session(self, capacity: int) -> Session:
        raise NotImplementedError

    @property
    def stages(self) -> int:
        """The stages a step goes through in turn: 1 in one process (a gateway: itself and each node of its route)."""
        return 1

    @cached_property
    def vocabulary(self) -> Vocabulary:
        """The tokenizer as structured output reads it (built on first use: about a second)."""
        return Vocabulary(self.tokenizer)

    def generate(self, prompt: list[int], params: GenerationParams,
                 stats: GenerationStats | None = None) -> Iterator[Piece]:
        """Yield the answer's text; the session is freed when this ends, fails or is closed early."""
        if not self.causal:
            raise CannotGenerate(f"{self.spec.name} is an embedding model ({self.spec.architecture}): it cannot "
                                 "generate text, only embed it")
        check_prompt(prompt, self.context_length)  # before any cache is allocated
        capacity = min(self.context_length, len(prompt) + params.max_tokens)
        session = self.open_session(capacity)
        with _counting:
            self.generating = self.generating + 1
        try:
            verify = None
            if self.speculative and hasattr(session, "verify"):
                verify = Verifier(session.verify, lambda: drafting_pays(self.generating, self.stages))
            yield from generate(session.forward, self.tokenizer, prompt, params, capacity, stats, verify)
        finally:
            with _counting:
                self.generating -= 1
            session.close()

    def chat(self, messages: list[dict[str, str]], params: GenerationParams,
             stats: GenerationStats | None = None) -> Iterator[Piece]:
        prompt = self.tokenizer.encode(self.tokenizer.render_chat(messages), add_special=True)
        return self.generate(prompt, params, stats)

    def embed(self, tokens: list[int]) -> torch.Tensor:
        """float32 [dim]: the final hidden states (after the model's last norm) averaged over the tokens and
        scaled to unit length, as llama.cpp's `--embeddings` pools a generative model by default; an encoder's pooled
        as its file says (mean, or its first token's: [CLS]) and given its input whole (its positions see each
        other, so a chunk could not see the next)."""
        if not tokens:
            raise ValueError("the input is empty")
        if len(tokens) > self.context_length:
            raise ContextOverflowError(f"the input has {len(tokens)} tokens; the context holds {self.context_length}")
        session = self.open_session(len(tokens))
        try:
            if not hasattr(session, "final_hidden"):
                raise EmbeddingsUnsupported("embeddings need the model's final hidden states, which this engine's "
                                            "sessions do not give (a gateway over nodes cannot yet)")
            chunk = PREFILL_CHUNK if self.causal else len(tokens)
            total = torch.zeros(self.spec.dim, dtype=torch.float64)
            for start in range(0, len(tokens), chunk):
                hidden = session.final_hidden(tokens[start:start + chunk], start).double()
                if self.pooling == "mean":  # the sum: scaled to unit length, it is the mean's direction
                    total += hidden.sum(0)
                elif self.pooling == "cls" and start == 0:
                    total = hidden[0]
                elif self.pooling == "last":
                    total = hidden[-1]
        finally:
            session.close()
        return torch.nn.functional.normalize(total, dim=0).float()


def as_torch(model: SpanModel, hidden: Any) -> torch.Tensor:
    """Hidden states [T, dim] of any backend (an mx.array on MLX) as float32 torch, for pooling: through the
    little-endian bytes every backend writes for the wire."""
    data = bytearray(model.hidden_to_bytes(hidden, "float32"))
    return torch.frombuffer(data, dtype=torch.float32).view(-1, model.spec.dim)


class LocalSession:
    def __init__(self, model: SpanModel, capacity: int):
        self.model, self.cache = model, model.new_cache(capacity)
        self.filled = 0  # positions the cache holds

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        return self.verify(tokens, start, rows=1)[0]

    def verify(self, tokens: list[int], start: int, rows: int | None = None) -> torch.Tensor:
        """Logits [rows, vocab] of the last `rows` positions (all by default: a speculative pass)."""
        if start < self.filled:  # a step taken back (a rejected draft): none of it stays
            self.cache.truncate(start)
        hidden = self.model.forward_span(self.model.embed(tokens), self.cache, start)
        self.filled = start + len(tokens)
        return self.model.head(hidden[-(rows or len(tokens)):])

    def final_hidden(self, tokens: list[int], start: int) -> torch.Tensor:
        hidden = self.model.final_norm(self.model.forward_span(self.model.embed(tokens), self.cache, start))
        return as_torch(self.model, hidden)

    def close(self) -> None:
        self.cache.clear()


class LocalEngine(Engine):
    def __init__(self, model: SpanModel, tokenizer: Tokenizer, context_length: int, backend: str = backends.DEFAULT):
        self.model, self.tokenizer, self.context_length = model, tokenizer, context_length
        self.spec, self.backend = model.spec, backend
        self.causal, self.pooling = model.causal, model.pooling

    @classmethod
    def load(cls, path: str | Path, context_length: int | None = None, progress: bool = False,
             backend_name: str = backends.DEFAULT) -> "LocalEngine":
        """`path`: a .gguf file or a model folder. `progress`: report the bytes read on stderr (a bar on a terminal,
        plain lines otherwise)."""
        file = open_model(path)
        model = backends.load_span(file, progress=progress, backend_name=backend_name)
        context = min(context_length or DEFAULT_CONTEXT, model.spec.context_length)
        return cls(model, load_tokenizer(file), context, backend_name)

    def open_session(self, capacity: int) -> LocalSession:
        return LocalSession(self.model, capacity)


__all__ = ["DEFAULT_CONTEXT", "CannotGenerate", "EmbeddingsUnsupported", "Engine", "HiddenSession", "LocalEngine",
           "LocalSession", "Session", "as_torch"]
