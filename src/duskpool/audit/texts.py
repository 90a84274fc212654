"""What the audit attacks and what its attackers learn from.

- Held-out prompts: what a user would type, a PIN and a password among them. Their tokens are what the
  attackers try to recover; nothing an attacker fits ever sees them.
- The attackers' own text: a public-domain chapter (corpus.txt) and random token sequences, the two things
  anyone holding the public model can push through it.

A model without a tokenizer (a test's random Llama) is audited on random token ids instead.
"""

from dataclasses import dataclass
from importlib import resources

import numpy as np

from duskpool.engine.tokenizer import NoChatTemplateError, Tokenizer


@dataclass(frozen=True)
class Prompt:
    text: str
    secrets: tuple[str, ...] = ()  # substrings of `text` whose tokens are scored on their own


HELD_OUT = (
    Prompt("My bank card PIN is 4921 and I keep forgetting it. How can I remember it without writing it "
           "down?", ("4921",)),
    Prompt("Log in to the router for me: the user name is admin and the password is Tr0ub4dor&3x-Blue. "
           "Then turn off remote management.", ("Tr0ub4dor&3x-Blue",)),
    Prompt("My doctor, Amira Haddad, says my blood sugar is too high and wants me to start metformin. "
           "What should I ask her on Friday?"),
    Prompt("Write to my landlord at 42 Wren Street that the March rent will be two weeks late because my "
           "hours at the bakery were cut."),
    Prompt("The office door code is 7305 and the guest wifi passphrase is violet-harbor-92. Write a short "
           "welcome note for our new intern, Tomasz.", ("7305", "violet-harbor-92")),
)


@dataclass(frozen=True)
class Sample:
    """One sequence as the gateway would send it, and which of its positions the audit scores."""

    tokens: list[int]
    scored: list[int]  # positions of the user's own tokens (a chat template's are public anyway)
    secret: list[int]  # positions of the PIN's and password's tokens


def held_out(tokenizer: Tokenizer, prompts: tuple[Prompt, ...] = HELD_OUT) -> list[Sample]:
    """Each prompt inside the model's chat template (what the gateway sends), when it has one."""
    return [_sample(tokenizer, prompt) for prompt in prompts]


def _sample(tokenizer: Tokenizer, prompt: Prompt) -> Sample:
    try:
        chat = tokenizer.render_chat([{"role": "user", "content": prompt.text}])
    except NoChatTemplateError:  # a base model: the prompt as raw text
        chat = prompt.text
    before, found, after = chat.partition(prompt.text)
    if not found:  # a template that rewrites the message: the raw text
        before, after = "", ""
    head = tokenizer.encode(before)  # with BOS, where the model adds one
    encoding = tokenizer.backend.encode(prompt.text, add_special_tokens=False)
    tail = tokenizer.encode(after, add_special=False) if after else []
    spans = [(prompt.text.index(s), prompt.text.index(s) + len(s)) for s in prompt.secrets]
    secret = [len(head) + i for i, (a, b) in enumerate(encoding.offsets)
              if any(a < end and b > start for start, end in spans)]
    scored = list(range(len(head), len(head) + len(encoding.ids)))
    return Sample(head + list(encoding.ids) + tail, scored, secret)


def corpus() -> str:
    """The attackers' public-domain text (chapter I of Alice's Adventures in Wonderland)."""
    text = resources.files("duskpool.audit").joinpath("corpus.txt").read_text(encoding="utf-8")
    return text.split("\n\n", 1)[1]  # without the line that says where it comes from


def windows(tokens: list[int], length: int, limit: int) -> list[list[int]]:
    """The first `limit` tokens cut into sequences of `length`."""
    tokens = tokens[:limit]
    return [tokens[i:i + length] for i in range(0, len(tokens), length) if len(tokens[i:i + length]) > 1]


def random_sequences(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, length).tolist() for _ in range(count)]


def random_samples(vocab_size: int, count: int, length: int, seed: int) -> list[Sample]:
    """Held-out sequences for a model without a tokenizer: random ids, every position scored."""
    return [Sample(s, list(range(length)), []) for s in random_sequences(vocab_size, count, length, seed)]
