"""The tokenizer a GGUF file describes, rebuilt with the `tokenizers` library, and its chat template; or a model
folder's own tokenizer.json, which that library reads as it is (`Tokenizer.from_folder`).

A GGUF has no `tokenizer.json`: it stores the vocabulary, merges and special ids as metadata under
llama.cpp's key names. We rebuild the tokenizer the way llama.cpp reads those keys
(`src/llama-vocab.cpp`), so a prompt becomes the ids the model was trained on. Gemma's sentencepiece
vocabulary is read as transformers reads it (tests/engine/test_tokenizer.py holds the two to the same ids), and
BERT's WordPiece as transformers' BertTokenizerFast runs it (tests/models/test_bert.py).
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE, WordPiece

# tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a turn in common chat formats, whatever the metadata names as EOS.
END_OF_TURN = {"<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"}

# Architectures whose sentencepiece vocabulary is read the way transformers reads Gemma's (see _build_sentencepiece).
GEMMA = {"gemma", "gemma2", "gemma3"}

# Used when the file has no chat template but its vocabulary has ChatML's tokens: plain ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Pre-tokenizer regexes, from llama-vocab.cpp (which states the tokenizer.json originals).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (family, whether llama.cpp looks a whole word up in the vocab before merging)
PRE_TOKENIZERS = {
    # llama.cpp's 'default' is a rougher regex meant for old files; transformers and we use GPT-2's
    "default": ("gpt2", False), "gpt-2": ("gpt2", False), "phi-2": ("gpt2", False),
    "mpt": ("gpt2", False), "olmo": ("gpt2", False),
    # GPT-2's regex after splitting every digit off on its own
    "smollm": ("digits", False), "starcoder": ("digits", False), "refact": ("digits", False),
    "command-r": ("digits", False), "codeshell": ("digits", False), "exaone": ("digits", False),
    "llama3": ("llama3", True), "llama-v3": ("llama3", True), "llama-bpe": ("llama3", True),
    "falcon3": ("llama3", True), "dbrx": ("llama3", False), "smaug-bpe": ("llama3", False),
    "qwen2": ("qwen2", False), "deepseek-r1-qwen": ("qwen2", False), "stablelm2": ("qwen2", False),
}


def _byte_level(split: str | None) -> pre_tokenizers.PreTokenizer:
    """Split with `split` (GPT-2's own regex when None), then spell the bytes in GPT-2's alphabet."""
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    if family == "digits":
        # SmolLM's own tokenizer.json: Sequence[Digits(individual), ByteLevel]; llama.cpp splits \p{N} first
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(None)])
    return _byte_level({"gpt2": None, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[family])


def _gpt2_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the spelling of byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def _merges_from_scores(scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges a sentencepiece vocabulary implies: every split of a token into two tokens, best score first.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose union scores highest; BPE with
    merges ranked by that score does the same. The splits of one token go longest left piece first, as
    transformers orders them (`generate_merges`).
    """
    ranked = [(-score, t, -k, t[:k], t[k:]) for t, score in scores.items() for k in range(1, len(t))
              if t[:k] in scores and t[k:] in scores]
    return [(a, b) for *_, a, b in sorted(ranked)]


def _metadata_id(meta: dict, key: str, vocab_size: int) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    return value if isinstance(value, int) and 0 <= value < vocab_size else None


@dataclass
class Tokenizer:
    """Text <-> ids for one model, and its chat template; build it with `from_gguf_metadata`."""

    backend: tokenizers.Tokenizer = field(repr=False)
    tokens: list[str] = field(repr=False)
    bos_id: int | None
    eos_id: int | None
    stop_ids: set[int]
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = CHATML_TEMPLATE  # None: a base model, completed as raw text only

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        model = meta.get("tokenizer.ggml.model")
        tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise ValueError("the model file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        if model == "gpt2":
            backend, add_bos = _build_byte_level(meta, tokens, types)
        elif model == "llama":
            backend, add_bos = _build_sentencepiece(meta, tokens, types), True
        elif model == "bert":
            backend, add_bos = _build_wordpiece(meta, tokens, types), True
        else:
            raise ValueError(f"unsupported tokenizer model {model!r} (supported: 'gpt2', 'llama', 'bert')")

        # Control and user-defined tokens are matched whole in the text, as llama.cpp does; only control
        # tokens count as special (skipped when decoding). A user-defined token the vocabulary spells another
        # way (Gemma's runs of spaces, spelled '▁▁') is left to the merges, as transformers does.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types, strict=True) if k == CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for i, (t, k) in enumerate(zip(tokens, types, strict=True))
                            if k == USER_DEFINED and backend.token_to_id(t) == i])

        n = len(tokens)
        bos, eos = _metadata_id(meta, "bos_token_id", n), _metadata_id(meta, "eos_token_id", n)
        if model == "bert":  # [CLS] text [SEP]; files converted before gguf-py named them BOS and EOS say cls and sep
            bos = bos if bos is not None else _metadata_id(meta, "cls_token_id", n)
            eos = eos if eos is not None else _metadata_id(meta, "seperator_token_id", n)
        stop = {i for i in (eos, _metadata_id(meta, "eot_token_id", n), _metadata_id(meta, "eom_token_id", n))
                if i is not None}
        stop |= {i for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k == CONTROL and t in END_OF_TURN}
        return cls(backend, tokens, bos, eos, stop,
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos)) and bos is not None,
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", model == "bert")) and eos is not None,
                   chat_template=meta.get("tokenizer.chat_template") or _default_template(tokens, types))

    @classmethod
    def from_folder(cls, path: Path) -> "Tokenizer":
        """A Hugging Face folder's tokenizer: tokenizer.json as its authors wrote it (vocabulary, merges, pre-tokenizer,
        decoder, added tokens), tokenizer_config.json's special tokens and chat template (or chat_template.jinja),
        generation_config.json's end-of-turn ids."""
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        config = _json(path / "tokenizer_config.json")
        n = backend.get_vocab_size(with_added_tokens=True)
        tokens = [backend.id_to_token(i) or "" for i in range(n)]

        def special(key: str) -> int | None:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos, eos = special("bos_token"), special("eos_token")
        # what transformers' fast tokenizer adds: tokenizer.json's post-processor, unless the config says
        with_special, without = (backend.encode("a", add_special_tokens=flag).ids for flag in (True, False))
        add_bos = config.get("add_bos_token", bos is not None and with_special[:1] == [bos] != without[:1])
        add_eos = config.get("add_eos_token", eos is not None and with_special[-1:] == [eos] != without[-1:])
        generation = _json(path / "generation_config.json").get("eos_token_id")
        stop = {i for i in [eos, *(generation if isinstance(generation, list) else [generation])] if i is not None}
        stop |= {i for t in END_OF_TURN if (i := backend.token_to_id(t)) is not None}
        return cls(backend, tokens, bos, eos, stop, add_bos=bool(add_bos) and bos is not None,
                   add_eos=bool(add_eos) and eos is not None,
                   chat_template=_folder_template(path, config) or (
                       CHATML_TEMPLATE if {"<|im_start|>", "<|im_end|>"} <= set(tokens) else None))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and ids[:1] != [self.bos_id]:  # a template may write BOS itself
            ids.insert(0, self.bos_id)
        if add_special and self.add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it; NoChatTemplateError when it has none."""
        if self.chat_template is None:
            raise NoChatTemplateError("the model has no chat template (a base model): it can only complete raw "
                                      "text, not chat")

        def token(i: int | None) -> str:
            return self.tokens[i] if i is not None else ""

        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=token(self.bos_id), eos_token=token(self.eos_id))

    @cached_property
    def _template(self) -> Any:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        # jinja's own tojson escapes <, > and & for HTML; templates expect plain JSON (as transformers gives)
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        return env.from_string(self.chat_template)


class NoChatTemplateError(ValueError):
    """The model file has no chat template, so it cannot be chatted with (only raw text completed)."""


def _default_template(tokens: list[str], types: list[int]) -> str | None:
    """ChatML for a file without a template whose vocabulary has ChatML's control tokens; else none."""
    control = {t for t, k in zip(tokens, types, strict=True) if k == CONTROL}
    return CHATML_TEMPLATE if {"<|im_start|>", "<|im_end|>"} <= control else None


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _folder_template(path: Path, config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template (the default of a list of named ones), else transformers 4.43+'s own
    file for it."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        return template
    for name in ("chat_template.jinja", "chat_template.json"):
        if (path / name).is_file():
            text = (path / name).read_text()
            return json.loads(text).get("chat_template") if name.endswith(".json") else text
    return None


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _build_byte_level(meta: dict, tokens: list[str], types: list[int]) -> tuple[tokenizers.Tokenizer, bool]:
    """Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM ...); also returns llama.cpp's default for add_bos."""
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"unsupported pre-tokenizer {pre!r} for tokenizer model 'gpt2' "
                         f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    family, ignore_merges = PRE_TOKENIZERS[pre]
    # Normal tokens are stored spelled in GPT-2's byte alphabet; the odd one that is not gets respelled so
    # merges can reach it. Control and user-defined tokens keep their text: they are matched as added tokens.
    alphabet = _gpt2_alphabet()
    spelled = set(alphabet.values())
    vocab = {}
    for i, (t, k) in enumerate(zip(tokens, types, strict=True)):
        if k not in (CONTROL, USER_DEFINED) and not set(t) <= spelled:
            t = "".join(alphabet[b] for b in t.encode("utf-8"))
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = tokenizers.Tokenizer(BPE(vocab, merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = _pre_tokenizer(family)
    backend.decoder = decoders.ByteLevel()
    return backend, family == "llama3"


def _build_sentencepiece(meta: dict, tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """Sentencepiece-style BPE: spaces spelled '▁', unknown bytes as '<0xNN>' tokens."""
    gemma = meta.get("general.architecture") in GEMMA
    if gemma:
        # Gemma files store its runs of spaces ('▁▁' ... in the model's own tokenizer) as real spaces. The text
        # they meet has '▁' for every space by then, so they are spelled back to be found by the merges.
        tokens = [t.replace(" ", "▁") if t and not t.strip(" ") else t for t in tokens]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    elif gemma:
        # Gemma's merge order is the order of its vocabulary, over every token: its runs of spaces (scored
        # -1000) merge before any word does. transformers' GGUF reader ranks them so (`gemma_tokenizer`).
        merges = _merges_from_scores({t: -float(i) for t, i in vocab.items()})
    else:
        # no scores: earlier tokens rank higher, as in a BPE vocabulary
        scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
        normal = {}
        for t, k, score in zip(tokens, types, scores, strict=True):
            if k == NORMAL:
                normal.setdefault(t, score)
        merges = _merges_from_scores(normal)
    # the id the file names (Gemma marks its <unk> as a control token), else the token typed unknown
    unk_id = _metadata_id(meta, "unknown_token_id", len(tokens))
    unk = tokens[unk_id] if unk_id is not None else next(
        (t for t, k in zip(tokens, types, strict=True) if k == UNKNOWN), None)
    backend = tokenizers.Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp puts the prefix space before every stretch of text (after each special token too), which is
    # what a normalizer does: it runs on each piece between added tokens.
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *([decoders.Strip(" ", 1, 0)] if space_prefix else [])])
    return backend


def _build_wordpiece(meta: dict, tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """BERT's WordPiece, as transformers' BertTokenizerFast runs it: clean the text, split off CJK characters and
    punctuation, split on whitespace, then the longest pieces from the vocabulary ('##' marks a continuation); a word
    with no spelling is [UNK]. An uncased vocabulary (no capital letter in it) also lowercases and strips accents."""
    # llama.cpp's converter stores a "phantom space" spelling: a word's first piece as '▁' + piece, a continuation
    # without its '##' (control tokens as they are). Spelled back here.
    words = [t if k == CONTROL else t[1:] if t.startswith("\u2581") else "##" + t
             for t, k in zip(tokens, types, strict=True)]
    vocab = {}
    for i, word in enumerate(words):
        vocab.setdefault(word, i)
    unk_id = _metadata_id(meta, "unknown_token_id", len(tokens))
    backend = tokenizers.Tokenizer(WordPiece(vocab, unk_token=words[unk_id] if unk_id is not None else "[UNK]",
                                             continuing_subword_prefix="##", max_input_chars_per_word=100))
    uncased = not any("A" <= c <= "Z" for t, k in zip(tokens, types, strict=True) if k == NORMAL for c in t)
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=uncased,
                                                    lowercase=uncased)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


@dataclass
class StreamDecoder:
    """Turns ids, fed one at a time, into text pieces that never end inside a character.

    Decodes a short window (from the last emitted boundary) instead of everything so far: decoding the
    window's head alone and with the new ids, the difference is the new text. A decode that ends in
    U+FFFD is a character still missing bytes, so it waits for the next id.
    """

    tokenizer: Tokenizer
    skip_special: bool = True
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # window start: ids before it have been emitted and end on a character boundary
    read: int = 0  # ids before this have been emitted

    def feed(self, token_id: int) -> str:
        self.ids.append(token_id)
        head = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip_special)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip_special)
        if len(text) <= len(head) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(head):]

    def flush(self) -> str:
        """What is left (an incomplete character decodes as U+FFFD, as decode() shows it)."""
        head = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip_special)
        text = self.tokenizer.decode(self.ids[self.prefix:], self.skip_special)
        self.prefix = self.read = len(self.ids)
        return text[len(head):]


def render_chat_with_tools(tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """`render_chat` with tool definitions (OpenAI's shape), passed to the template as `tools` as transformers
    passes them; for the API's tool calling. (A `tools` argument of render_chat would make this go.)"""
    if tokenizer.chat_template is None:
        raise NoChatTemplateError("the model has no chat template (a base model): it can only complete raw text")

    def token(i: int | None) -> str:
        return tokenizer.tokens[i] if i is not None else ""

    return tokenizer._template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                      bos_token=token(tokenizer.bos_id), eos_token=token(tokenizer.eos_id))
