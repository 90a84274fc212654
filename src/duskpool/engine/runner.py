"""The single-process runner: the whole model in this process, one KV cache per session."""

from collections.abc import Iterator
from pathlib import Path

import torch

from duskpool.engine.generate import GenerationParams, GenerationStats, generate
from duskpool.engine.tokenizer import Tokenizer
from duskpool.models import Llama, load_model
from duskpool.weights import kernels
from duskpool.weights.gguf import GGUFFile, ModelFileError

DEFAULT_CONTEXT = 4096  # a session's KV cache is sized for this unless the model's own context is shorter


def set_threads(threads: int) -> None:
    """Compute threads for both torch and duskpool's own kernels."""
    torch.set_num_threads(threads)
    lib = kernels.library()
    if lib is not None and hasattr(lib, "dp_set_threads"):
        lib.dp_set_threads(threads)


class LocalEngine:
    def __init__(self, model: Llama, tokenizer: Tokenizer, context_length: int):
        self.model, self.tokenizer, self.context_length = model, tokenizer, context_length

    @classmethod
    def load(cls, path: str | Path, context_length: int | None = None) -> "LocalEngine":
        file = GGUFFile(path)
        model = load_model(file)
        try:
            tokenizer = Tokenizer.from_gguf_metadata(file.metadata)
        except ValueError as e:
            raise ModelFileError(f"{file.path}: {e}") from None
        context = min(context_length or DEFAULT_CONTEXT, model.config.context_length)
        return cls(model, tokenizer, context)

    def generate(self, prompt: list[int], params: GenerationParams,
                 stats: GenerationStats | None = None) -> Iterator[str]:
        cache = self.model.new_cache(min(self.context_length, len(prompt) + params.max_tokens))

        def forward(tokens: list[int], start: int) -> torch.Tensor:
            positions = torch.arange(start, start + len(tokens))
            hidden = self.model.forward_span(self.model.embed(torch.tensor(tokens)), cache, positions)
            return self.model.head(hidden[-1:])[0]

        return generate(forward, self.tokenizer, prompt, params, cache.capacity, stats)

    def chat(self, messages: list[dict[str, str]], params: GenerationParams,
             stats: GenerationStats | None = None) -> Iterator[str]:
        prompt = self.tokenizer.encode(self.tokenizer.render_chat(messages), add_special=True)
        return self.generate(prompt, params, stats)
