"""Qwen3 architecture hyperparameters, the named presets, and Hugging Face config.json mapping."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Qwen3Config:
    """The subset of Hugging Face's Qwen3Config that defines the architecture we build.

    vocab_size may be None in a preset (the trainer takes it from the tokenizer, `with_vocab`);
    a model cannot be built until it is set.
    """

    vocab_size: int | None
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    # Std of the embedding table at initialisation; None = initializer_range (HF's init). Only used
    # when a model is built from scratch; not an architecture field and not in config.json.
    embedding_init_std: float | None = None

    def with_vocab(self, vocab_size: int) -> "Qwen3Config":
        return dataclasses.replace(self, vocab_size=int(vocab_size))

    def replace(self, **changes) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "Qwen3Config":
        """Raise a one-line ValueError naming the bad field; returns self for chaining."""
        if self.vocab_size is None:
            raise ValueError("model: vocab_size is not set (take it from the tokenizer: "
                             "config.with_vocab(tokenizer.vocab_size))")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"model: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError("model: rope_theta and rms_norm_eps must be positive")
        if self.embedding_init_std is not None and not self.embedding_init_std > 0:
            raise ValueError(f"model: embedding_init_std must be positive or None, "
                             f"got {self.embedding_init_std!r}")
        return self

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (tied head counted once)."""
        self.validate()
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + 2 * d
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    # ---- Hugging Face config.json ------------------------------------------------------------

    def to_hf_config_dict(self, **extra: Any) -> dict[str, Any]:
        """A config.json dict that transformers loads as Qwen3ForCausalLM. `extra` is merged in
        (e.g. torch_dtype, bos/eos ids, our diffusion settings)."""
        self.validate()
        out: dict[str, Any] = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
        }
        out.update(extra)
        return out


def config_from_hf(hf: dict[str, Any] | Any) -> Qwen3Config:
    """Qwen3Config from a Hugging Face config.json dict (or a transformers config object).

    Refuses, with one line naming the field, anything our model would silently compute
    differently: another architecture, rope scaling, attention bias, sliding windows, another
    activation.
    """
    if not isinstance(hf, dict):
        hf = hf.to_dict()
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type != "qwen3" and "Qwen3ForCausalLM" not in archs:
        raise ValueError(f"model: config.json describes model_type={model_type!r} "
                         f"architectures={archs!r}; only Qwen3 (model_type 'qwen3') is supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"model: config.json hidden_act={hf['hidden_act']!r}; Qwen3 uses 'silu'")
    if hf.get("attention_bias", False):
        raise ValueError("model: config.json attention_bias=true is not supported (Qwen3 has none)")
    if hf.get("use_sliding_window", False):
        raise ValueError("model: config.json use_sliding_window=true is not supported")
    rope_theta = hf.get("rope_theta")
    # transformers 5 moves RoPE settings into `rope_parameters`
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"model: config.json rope type {rope_type!r} is not supported "
                             f"(only plain RoPE)")
        rope_theta = rope.get("rope_theta", rope_theta)
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if hf.get(k) is None]
    if missing:
        raise ValueError(f"model: config.json lacks {', '.join(missing)}")
    heads = int(hf["num_attention_heads"])
    return Qwen3Config(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    ).validate()


# Published values of the Qwen3 releases' config.json files on the Hugging Face Hub.
_QWEN3 = dict(vocab_size=151936, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
              max_position_embeddings=40960, head_dim=128)

PRESETS: dict[str, Qwen3Config] = {
    # The CPU demo model, trained from scratch in minutes. Embeddings start at std 1 rather than HF's
    # 0.02: with 0.02 a token's own identity is small next to what attention mixes into the residual
    # stream, and this model did not learn to copy letters from the prompt in the demo's budget.
    # rope_theta 100, not the usual 10,000 (Qwen3's own is 1e6): an example here spans under 30
    # positions, over which a base of 10,000 leaves 10 of head_dim 32's 16 rotary frequencies turning
    # less than one radian (4 with a base of 100), and reversing a word is a lookup at an exact offset.
    # The MLP is 2x the width, not 4x: the step is ~25% shorter and the tasks were learned no slower
    # (README, "Why the demo trains the way it does").
    "qwen3-tiny": Qwen3Config(vocab_size=None, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, rope_theta=100.0, tie_word_embeddings=True,
                              max_position_embeddings=40960, embedding_init_std=1.0),
    "qwen3-0.6b": Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                              num_attention_heads=16, num_key_value_heads=8,
                              tie_word_embeddings=True, **_QWEN3),
    "qwen3-1.7b": Qwen3Config(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                              num_attention_heads=16, num_key_value_heads=8,
                              tie_word_embeddings=True, **_QWEN3),
    "qwen3-4b": Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8,
                            tie_word_embeddings=True, **_QWEN3),
    "qwen3-8b": Qwen3Config(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8,
                            tie_word_embeddings=False, **_QWEN3),
}

# The seed trainer's name for its ~1.7B model.
ALIASES: dict[str, str] = {"flex-qwen-1b": "qwen3-1.7b"}


def preset_names() -> list[str]:
    return [*PRESETS, *ALIASES]


def get_preset(name: str) -> Qwen3Config:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"model: unknown preset {name!r}; allowed: {', '.join(preset_names())}")
    return PRESETS[key]
