"""Structured output: a grammar (a JSON Schema, any JSON object, a regular expression or a Lark grammar)
that every generated token must keep the text within, as a mask over the vocabulary at each step.

llguidance (what llama.cpp and vLLM use) computes the masks, from our own tokenizer: sampling happens at
the gateway, so the pipeline of nodes never knows a request was constrained.
"""

import json
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

from duskpool.engine.tokenizer import Tokenizer

# JSON as people write it on one line ({"a": 1, "b": [2, 3]}): with free whitespace a small model can emit
# newlines until it runs out of tokens, and the answer would not parse.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BITS = torch.arange(8, dtype=torch.uint8)


class GrammarError(ValueError):
    """A schema, expression or grammar llguidance cannot use (the request's fault: a 400)."""


class Vocabulary:
    """A tokenizer as llguidance reads it (the bytes of every token); building it takes about a second, so an
    engine builds one, on first use, and keeps it."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ends = sorted(tokenizer.stop_ids) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else None)
        self.ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=ends)

    def token_bytes(self, token: int) -> bytes:
        if self.ll.is_special_token(token):
            return self.tokenizer.tokens[token].encode()
        return self.ll.decode_bytes([token])

    def literal(self, text: str) -> str:
        """`text` as a Lark grammar writes it: a token llguidance counts as special (a control token, or one
        shaped like one, as `<tool_call>`) by its id, since the model writes it as that token; else a string."""
        ids = self.tokenizer.encode(text, add_special=False)
        if len(ids) == 1 and self.ll.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text)

    def grammar(self, source: str, what: str) -> "Grammar":
        """`source`: a grammar in llguidance's form (from `LLMatcher.grammar_from_*`); `what` names it in errors."""
        error = llguidance.LLMatcher.validate_grammar(source, self.ll)
        if error:
            raise GrammarError(f"the {what} cannot be used: {error.strip()}")
        return Grammar(self, source)

    def json_schema(self, schema: dict[str, Any] | bool) -> "Grammar":
        if not isinstance(schema, dict | bool):
            raise GrammarError("a JSON schema must be an object")
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except Exception as e:  # noqa: BLE001 - whatever llguidance says of a schema, it is the schema's fault
            raise GrammarError(f"the JSON schema cannot be used: {e}") from None
        return self.grammar(source, "JSON schema")

    def json_object(self) -> "Grammar":
        """Any JSON object (OpenAI's `json_object`, Ollama's `format: "json"`)."""
        return self.json_schema({"type": "object"})

    def regex(self, pattern: str) -> "Grammar":
        return self.grammar(llguidance.LLMatcher.grammar_from_regex(pattern), "regular expression")

    def lark(self, text: str) -> "Grammar":
        """A Lark grammar; `%json {schema}` in it stands for JSON that the schema validates."""
        return self.grammar(llguidance.LLMatcher.grammar_from_lark(text), "grammar")


@dataclass(frozen=True)
class Grammar:
    vocabulary: Vocabulary
    source: str

    def constraint(self) -> "Constraint":
        """A fresh matcher: one per generation."""
        return Constraint(self)


class Constraint:
    """Where one generation stands in its grammar: which tokens may come next."""

    def __init__(self, grammar: Grammar):
        self.n = grammar.vocabulary.tokenizer.vocab_size
        self.matcher = llguidance.LLMatcher(grammar.vocabulary.ll, grammar.source, log_level=0)
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():  # e.g. a schema too complex for llguidance's limits at this point
            raise GrammarError(f"structured output failed: {self.matcher.get_error().splitlines()[0]}")

    def allowed(self) -> torch.Tensor:
        """bool [vocab]: the tokens that keep the text within the grammar (the end tokens once it may end)."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        self._check()
        # little-endian 32-bit words: token t is bit t % 8 of byte t // 8
        return ((words.unsqueeze(1) >> _BITS) & 1).flatten()[:self.n].bool()

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._check()

    @property
    def finished(self) -> bool:
        """The text is complete and nothing may follow it but an end token."""
        return self.matcher.is_stopped()


__all__ = ["Constraint", "Grammar", "GrammarError", "JSON_OPTIONS", "Vocabulary"]
