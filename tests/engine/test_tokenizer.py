"""The tokenizer rebuilt from GGUF metadata vs transformers' tokenizer for the same file."""

import copy
import random
from pathlib import Path

import pytest

from duskpool.engine.tokenizer import CHATML_TEMPLATE, NoChatTemplateError, Tokenizer
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
    ({"tokenizer.ggml.model": "t5"}, "'t5'"),  # Unigram (T5, XLM-R): not yet
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm"}, "'deepseek-llm'"),
])
def test_unsupported_tokenizer_is_a_value_error(meta, named):
    meta = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1, 1], **meta}
    with pytest.raises(ValueError, match=named):
        Tokenizer.from_gguf_metadata(meta)


# Gemma 3: a sentencepiece vocabulary (byte fallback, runs of spaces, tabs and newlines as tokens of their own,
# its own control tokens), checked against transformers' tokenizer for the same file.

GEMMA_TEXTS = [
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say it's fine, don't you think?",
    "Café déjà vu, naïve résumé, Ångström façade; e\u0301 (decomposed) is not é; Straße, ﬁne, ＦＵＬＬ width.",
    "你好，世界！这是一个测试。日本語のテキストとカタカナ、ひらがな。한국어 텍스트도 있습니다.",
    "مرحبا بالعالم، كيف حالك؟ Привет, мир! Как дела? नमस्ते दुनिया, आप कैसे हैं? Γειά σου κόσμε.",
    "Emoji: 😀👍🏽🇯🇵 ❤️ family 👨‍👩‍👧‍👦 coder 👩🏽‍💻 thumbs 👍🏿👍🏻 🦀🤖🎉",
    "Pi is 3.14159, a million is 1,000,000, today is 2024-05-01, call 555-0123 at 9:30pm; 0x1F, 1e-10, "
    "12345678901234567890.",
    "Fullwidth １２３, Arabic-Indic ١٢٣, Devanagari १२३, fractions ½ ⅞, powers x² and 10⁻³, ℕ ⊂ ℤ ⊂ ℚ, ∑ᵢ aᵢ ≤ ∞.",
    "def greet(name: str) -> str:\n    if not name:\n        return None\n    return f\"Hello, {name}!\"\n\n\n"
    "class Point:\n\tdef __init__(self, x, y):\n\t\tself.x, self.y = x, y\n",
    "#include <stdio.h>\nint main(void) {\n    for (int i = 0; i < 10; i++) { printf(\"%d\\n\", i * i); }\n"
    "    return x && y || !z ? a->b : c::d; // done /* block */\n}\n",
    'const data = {"name": "duskpool", "tags": ["a", "b"], "nested": {"ok": true, "n": null, "x": -1.5e3}};',
    "SELECT id, name FROM users WHERE age >= 21 AND email LIKE '%@example.com' ORDER BY id DESC LIMIT 10;",
    "https://example.com/a/b?q=1&r=two#frag C:\\Users\\me\\file.txt ~/dir/../x_y-z.tar.gz user@host:22",
    "tabs\tand\ttabs\t\tdouble\t\t\t\ttriple\n\n\nthree newlines   trailing spaces   \n  \n",
    "    leading spaces, a lone\r\nCRLF and \r a lone CR, then\n\n\n\n\n\n\n\n seven",
    "a" + " " * 40 + "b" + " " * 31 + "c" + " " * 32 + "d" + " " * 70 + "e" + "\t" * 35 + "f" + "\n" * 33 + "g",
    "<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\nRayleigh scattering.<end_of_turn>\n",
    "text<eos>glued<pad>to<mask>special<unk>tokens and <start_of_turn> spaced <end_of_turn> ones, <bos> mid-text",
    "<table><tr><td>1</td><td>2</td></tr></table> <b>bold</b> <code>x</code> <h1>Title</h1> [multimodal] <unused0>",
    "<start_of_image> an image here <end_of_image>; not special: <s> </s> <|im_start|> <|endoftext|> <start_of_turn",
    "Bytes without a token of their own: \ue000\U000f0000 \U0001d518\U0001d52b 𓀀 \x00\x01\x1f\x7f \u200b\ufeff end.",
    "ALL CAPS SHOUTING, camelCaseWords, snake_case_words, kebab-case-words, PascalCase, SCREAMING_SNAKE.",
    "\"Quotes\" «guillemets» „Anführungszeichen“ 'single' `backticks` — em dash – en dash … ellipsis ‰ § ¶ † ‡ • ©®™",
    "",
]
# A '▁' in the text is read as a space (as sentencepiece and transformers read it), so it does not round-trip.
GEMMA_TEXTS_WITH_METASPACE = ["▁▁▁word", "a▁ ▁b", "x ▁  ▁▁   y", "▁ -é▁\n\n", "d▁ <start_of_turn>a"]


def gemma_fuzz(count: int = 400, seed: int = 0) -> list[str]:
    """Short random strings from pieces that meet at awkward places: runs of spaces, '▁', specials, digits."""
    rng = random.Random(seed)
    alphabet = [*" \n\t\rabcdé😀你<>_-=0123456789▁", "<start_of_turn>", "<end_of_turn>", "  ", "   ", "\n\n",
                "the", " of", "<b>", "\U000f0000"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(count)]


# Gemma 3's own tokenizer (the one its safetensors repos ship), from others' tests: ollama's TestGemma3 (for
# gemma-3-4b-it) prompts with these ids; "Hello" is 9259 in Gemma's vocabulary.
GEMMA_KNOWN_IDS = {
    "<start_of_turn>user\nwhy is the sky blue<end_of_turn>\n<start_of_turn>model":
        [2, 105, 2364, 107, 36425, 563, 506, 7217, 3730, 106, 107, 105, 4368],
    "Hello": [2, 9259],
}


@pytest.fixture(scope="module")
def gemma_metadata(gemma_model: Path) -> dict:
    return GGUFFile(gemma_model).metadata


@pytest.fixture(scope="module")
def gemma(gemma_metadata: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gemma_metadata)


@pytest.fixture(scope="module")
def gemma_reference(gemma_model: Path):
    """transformers' tokenizer for the file: the class AutoTokenizer picks for gemma3, built the same way.

    AutoTokenizer first reads the whole file's metadata with gguf-py to learn the architecture (~40 s here);
    the class itself reads only the tokenizer's keys.
    """
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    assert "GemmaTokenizer" in str(TOKENIZER_MAPPING_NAMES["gemma3"])
    return transformers.GemmaTokenizer.from_pretrained(str(gemma_model.parent), gguf_file=gemma_model.name)


def first_difference(tok: Tokenizer, got: list[int], expected: list[int]) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    return f"from id {i}: {pieces(tok, got[i:i + 6])} != {pieces(tok, expected[i:i + 6])}"


def test_gemma_known_ids(gemma):
    for text, ids in GEMMA_KNOWN_IDS.items():
        assert gemma.encode(text) == ids, first_difference(gemma, gemma.encode(text), ids)


@pytest.mark.slow
def test_gemma_reference_is_gemmas_tokenizer(gemma_reference):
    for text, ids in GEMMA_KNOWN_IDS.items():
        assert gemma_reference(text)["input_ids"] == ids, text
    assert gemma_reference.chat_template is None  # the 270M base model has none


@pytest.mark.slow
def test_gemma_encode_matches_transformers(gemma, gemma_reference):
    texts = GEMMA_TEXTS + GEMMA_TEXTS_WITH_METASPACE + ["\n".join(GEMMA_TEXTS)] + gemma_fuzz()
    assert sum(map(len, GEMMA_TEXTS)) > 2000
    for text in texts:
        expected = gemma_reference(text)["input_ids"]  # with BOS: the file says add_bos
        got = gemma.encode(text)
        assert got == expected, f"{text!r}: {first_difference(gemma, got, expected)}"


@pytest.mark.slow
@pytest.mark.parametrize("skip_special", [True, False])
def test_gemma_decode_matches_transformers(gemma, gemma_reference, skip_special):
    for text in GEMMA_TEXTS + GEMMA_TEXTS_WITH_METASPACE + gemma_fuzz(100):
        ids = gemma.encode(text)
        assert gemma.decode(ids, skip_special) == gemma_reference.decode(ids, skip_special_tokens=skip_special), text


def test_gemma_decode_round_trips(gemma):
    for text in GEMMA_TEXTS + [t for t in gemma_fuzz() if "▁" not in t]:
        assert gemma.decode(gemma.encode(text, add_special=False), skip_special=False) == text
    assert gemma.decode(gemma.encode("a▁b", add_special=False)) == "a b"


def test_gemma_tokens_of_its_own(gemma):
    def one(text: str) -> int:
        ids = gemma.encode(text, add_special=False)
        assert len(ids) == 1, f"{text!r} is {pieces(gemma, ids)}"
        return ids[0]

    assert [one(t) for t in ["<start_of_turn>", "<end_of_turn>", "\n", "\n\n", "  ", " " * 31, "\t" * 31, "<b>"]] == \
        [105, 106, 107, 108, 138, 167, 255998, 200]
    # byte fallback: a character the vocabulary lacks is spelled as its UTF-8 bytes
    assert pieces(gemma, gemma.encode("hi \U000f0000", add_special=False)) == ["hi", "▁", "<0xF3>", "<0xB0>", "<0x80>",
                                                                              "<0x80>"]
    assert gemma.decode(gemma.encode("<start_of_turn>user\nhi<end_of_turn>")) == "user\nhi"  # specials skipped
    assert "[multimodal]" in gemma.decode(gemma.encode("[multimodal]"))  # user-defined, not special


def test_gemma_ids_and_flags_from_metadata(gemma):
    assert (gemma.bos_id, gemma.eos_id, gemma.vocab_size, gemma.add_bos) == (2, 1, 262144, True)
    assert gemma.stop_ids == {1, 106}  # <eos> and <end_of_turn>
    # a text (a template's output) that starts with <bos> gets no second one; transformers would add it
    assert gemma.encode("<bos>hi") == gemma.encode("hi") == [2, 2202]


def test_gemma_stream_decoding_equals_full_decode(gemma):
    text = GEMMA_TEXTS[4] + GEMMA_TEXTS[19]
    ids = gemma.encode(text)
    assert any("\ufffd" in gemma.decode([i]) for i in ids), "no token splits a character: the test proves nothing"
    parts = stream(gemma, ids)
    assert not any("\ufffd" in p for p in parts), parts
    assert "".join(parts) == gemma.decode(ids)


def test_gemma_has_no_chat_template(gemma, gemma_metadata):
    # a base model, and no ChatML tokens in its vocabulary to fall back on: chat is refused, raw text is not
    assert "tokenizer.chat_template" not in gemma_metadata and gemma.chat_template is None
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        gemma.render_chat(MESSAGES)
