"""The tokenizer rebuilt from GGUF metadata vs transformers' tokenizer for the same file."""

import copy
from pathlib import Path

import pytest

from duskpool.engine.tokenizer import CHATML_TEMPLATE, Tokenizer
from duskpool.weights.gguf import GGUFFile

NO_DIGITS = [
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say it's fine, don't you think?",
    "Café déjà vu, naïve résumé, Ångström façade",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ、ひらがな。",
    "مرحبا بالعالم، كيف حالك؟",
    "Привет, мир! Как дела?",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Emoji: 😀👍🏽🇯🇵 ❤️ family 👨‍👩‍👧‍👦 coder 👩🏽‍💻 thumbs 👍🏿👍🏻",
    "def greet(name):\n    if name:\n        return f\"Hello, {name}!\"\n    return None\n",
    '{"name": "duskpool", "tags": ["a", "b"], "nested": {"ok": true, "none": null}}',
    "tabs\tand\ttabs\t\tdouble\n\n\nthree newlines   trailing spaces   \n  \n",
    "    leading spaces and a lone\r\nCRLF",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi!<|im_end|>",
    "text<|endoftext|>glued<jupyter_code>tokens",
    "",
]

WITH_DIGITS = [
    "Pi is 3.14159, a million is 1,000,000 and today is 2024-05-01.",
    "a  1",  # two spaces before a digit: where splitting digits first changes the result
    "x =   42\ny = x * 7 + 1e-3",
    "for i in range(10):\n    print(i ** 2)\n",
    '{"id": 12345, "price": 19.99, "items": [1, 2, 3]}',
    "Fullwidth １２３, Arabic-Indic ١٢٣, Devanagari १२३, fractions ½ and powers x²",
    "Call 555-0123 at 9:30pm on 12/25 🎄",
]


@pytest.fixture(scope="module")
def metadata(bundled_model: Path) -> dict:
    return GGUFFile(bundled_model).metadata


@pytest.fixture(scope="module")
def tok(metadata: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="module")
def reference(bundled_model: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(bundled_model.parent), gguf_file=bundled_model.name)


@pytest.fixture(scope="module")
def digit_reference(reference):
    """The reference with SmolLM's real pre-tokenizer: digits split off first.

    transformers' GGUF converter knows no 'smollm' pre-tokenizer and falls back to plain GPT-2 ByteLevel,
    but SmolLM2's own tokenizer.json is Sequence[Digits(individual_digits=True), ByteLevel], and llama.cpp
    splits \\p{N} before the GPT-2 regex for 'smollm'. The model was trained on the digit-split ids, so
    that is what we match; on text without digits the two agree.
    """
    from tokenizers import pre_tokenizers

    fixed = copy.deepcopy(reference)
    backend = fixed.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     backend.pre_tokenizer])
    return fixed


def pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.tokens[i] for i in ids]


@pytest.mark.slow
@pytest.mark.parametrize("text", NO_DIGITS)
def test_encode_matches_transformers(tok, reference, text):
    expected = reference(text, add_special_tokens=False)["input_ids"]
    got = tok.encode(text)
    assert got == expected, f"{text!r}: {pieces(tok, got)} != {pieces(tok, expected)}"


@pytest.mark.slow
@pytest.mark.parametrize("text", WITH_DIGITS)
def test_encode_with_digits_matches_digit_split_reference(tok, digit_reference, text):
    expected = digit_reference(text, add_special_tokens=False)["input_ids"]
    got = tok.encode(text)
    assert got == expected, f"{text!r}: {pieces(tok, got)} != {pieces(tok, expected)}"


@pytest.mark.slow
def test_digit_split_is_a_real_difference(tok, reference):
    # the as-is reference cuts "a  1" as "a", " ", " 1"; with digits split off first the two spaces stay whole
    assert pieces(tok, tok.encode("a  1")) == ["a", "ĠĠ", "1"]
    assert reference("a  1", add_special_tokens=False)["input_ids"] != tok.encode("a  1")


@pytest.mark.slow
@pytest.mark.parametrize("skip_special", [True, False])
def test_decode_matches_transformers(tok, reference, skip_special):
    for text in NO_DIGITS + WITH_DIGITS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special) == reference.decode(ids, skip_special_tokens=skip_special), text


def test_decode_round_trips(tok):
    for text in NO_DIGITS + WITH_DIGITS:
        assert tok.decode(tok.encode(text), skip_special=False) == text


def test_special_tokens_are_single_ids(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == tok.tokens.index("<|im_start|>")
    assert tok.encode("<|im_end|>") == [tok.tokens.index("<|im_end|>")]
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


def test_ids_and_flags_from_metadata(tok):
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    assert tok.stop_ids == {2}  # eos is <|im_end|>
    assert tok.encode("hi", add_special=True) == tok.encode("hi", add_special=False)  # add_bos is False


def stream(tok: Tokenizer, ids: list[int], skip_special: bool = True) -> list[str]:
    decoder = tok.stream(skip_special)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", [
    "Emoji 👨‍👩‍👧‍👦👩🏽‍💻🇯🇵🎉😀 and more 🤖🦀 then 日本語のテキスト 你好世界 한국어 텍스트",
    "<|im_start|>assistant\n你好！👋🏾 Let's go.<|im_end|>",
])
def test_stream_decoding_equals_full_decode(tok, text):
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "no token splits a character: the test proves nothing"
    for skip_special in (True, False):
        parts = stream(tok, ids, skip_special)
        assert not any("\ufffd" in p for p in parts), parts
        assert "".join(parts) == tok.decode(ids, skip_special)


def test_stream_flush_shows_an_unfinished_character(tok):
    ids = tok.encode("ok 😀")[:-1]  # the emoji's last byte never comes
    parts = stream(tok, ids)
    assert "".join(parts) == tok.decode(ids) and parts[-1].endswith("\ufffd")


MESSAGES = [{"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": "What is 2 + 2? Answer with <b>tags</b> & émojis 🙂"}]


@pytest.mark.slow
def test_chat_template_matches_transformers(tok, reference):
    expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(MESSAGES) == expected
    assert tok.render_chat(MESSAGES, add_generation_prompt=False) == reference.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=False)


def test_chatml_fallback_and_template_errors(metadata):
    plain = Tokenizer.from_gguf_metadata({k: v for k, v in metadata.items() if k != "tokenizer.chat_template"})
    assert plain.chat_template == CHATML_TEMPLATE
    assert plain.render_chat(MESSAGES[1:]) == f"<|im_start|>user\n{MESSAGES[1]['content']}<|im_end|>\n" \
                                              "<|im_start|>assistant\n"
    strict = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.chat_template":
                                           "{{ bos_token }}{{ raise_exception('only user turns') }}"})
    with pytest.raises(ValueError, match="only user turns"):
        strict.render_chat(MESSAGES)


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "llama3", "qwen2"])
def test_other_pre_tokenizers_round_trip(metadata, pre):
    meta = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.add_bos_token"}
    tok = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": pre})
    assert tok.add_bos == pre.startswith("llama")  # llama.cpp's default when the file does not say
    for text in NO_DIGITS + WITH_DIGITS:
        assert tok.decode(tok.encode(text, add_special=False), skip_special=False) == text


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_split_regexes_match_transformers(metadata, reference, pre):
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    theirs = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), "isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ours = Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": pre}).backend.pre_tokenizer
    for text in NO_DIGITS + WITH_DIGITS:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text


def tiny_sentencepiece(**extra) -> dict:
    """A 'llama' vocabulary: specials, 256 byte tokens, characters and a few merged words."""
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "ld",
             "orld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>", "<|eot_id|>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    types = [2, 3, 3, 3, *[6] * 256, *[1] * len(words)]
    scores = [0.0] * (4 + 256) + [-float(len(w) == 1) * 10 - i * 0.1 for i, w in enumerate(words)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            **extra}


def test_sentencepiece_vocab_round_trips():
    tok = Tokenizer.from_gguf_metadata(tiny_sentencepiece())
    ids = tok.encode("hello world")
    assert pieces(tok, ids) == ["<s>", "▁hello", "▁world"]  # BOS by default, the prefix space added
    assert tok.decode(ids) == "hello world"
    assert pieces(tok, tok.encode("hi\n", add_special=False)) == ["▁", "h", "<0x69>", "<0x0A>"]  # byte fallback
    assert tok.stop_ids == {2, 3}
    for text in ["hello world", " hello  world", "hello\n\tworld!", "€ 😀 héllo", "world hello "]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert "".join(stream(tok, ids)) == text


def test_sentencepiece_without_space_prefix():
    tok = Tokenizer.from_gguf_metadata(tiny_sentencepiece(**{"tokenizer.ggml.add_space_prefix": False,
                                                             "tokenizer.ggml.add_bos_token": False}))
    assert pieces(tok, tok.encode("hello world")) == ["hello", "▁world"]
    assert tok.decode(tok.encode("hello world")) == "hello world"


@pytest.mark.parametrize("meta, named", [
    ({"tokenizer.ggml.model": "bert"}, "'bert'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm"}, "'deepseek-llm'"),
])
def test_unsupported_tokenizer_is_a_value_error(meta, named):
    meta = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1, 1], **meta}
    with pytest.raises(ValueError, match=named):
        Tokenizer.from_gguf_metadata(meta)
