"""The `data.*` configuration: defaults, normalisation to a plain dict, validation.

The Hydra files train/configs/data/{sft,pretrain}.yaml carry the same keys and defaults (a test keeps
them in step); this module lets the package be used without Hydra (plain dicts, tests, notebooks).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

from .errors import DataError

DEFAULTS: dict[str, Any] = {
    "dataset_name": "bundled:alpaca/train.json",
    "weights": None,
    "eval_dataset_name": None,
    "eval_examples": 64,
    "block_size": 128,
    "padding": "pack",
    "on_error": "raise",
    "text_field": "text",
    "shuffle": True,
    "hf_split": "train",
    "sft": {
        "format": "alpaca",
        "template": "qwen3",
        "include_system_prompt": True,
        "instruction_response_separator": "\n\n### Response:\n",
        "custom_format": {
            "instruction_field": "instruction",
            "response_field": "output",
            "system_field": None,
        },
        "train_on": "all_assistant",
        "overlength": "truncate",
        "pad_response_to": 0,
    },
}

CHOICES: dict[str, tuple[str, ...]] = {
    "padding": ("pack", "pad"),
    "on_error": ("raise", "skip"),
    "sft.format": ("alpaca", "sharegpt", "messages", "custom"),
    "sft.template": ("auto", "qwen3", "separator"),
    "sft.train_on": ("all_assistant", "last_assistant"),
    "sft.overlength": ("truncate", "drop"),
}

TRAINING_MODES = ("sft", "pretrain")


class Settings(dict):
    """A validated data config (or its `sft` part): lets hot paths skip re-validation."""


def to_plain(cfg: Any) -> Any:
    """An OmegaConf node (or anything mapping-like) as plain python containers."""
    if cfg is None:
        return None
    try:  # omegaconf is optional for users of plain dicts
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg


def _merge(defaults: dict, given: Mapping, prefix: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            warnings.warn(f"data config: unknown key '{prefix}{key}' ignored", stacklevel=3)
            continue
        if isinstance(defaults[key], dict) and isinstance(value, Mapping):
            out[key] = _merge(defaults[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def _choice(cfg: dict, dotted: str) -> None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    value = node[leaf]
    allowed = CHOICES[dotted]
    if value not in allowed:  # DataError is a ValueError: one line naming the key and the allowed values
        raise DataError(f"data.{dotted}: unknown value {value!r}; allowed: {', '.join(allowed)}")


def check_training_mode(training_mode: str) -> str:
    if training_mode not in TRAINING_MODES:
        raise ValueError(f"training_mode: unknown value {training_mode!r}; allowed: {', '.join(TRAINING_MODES)}")
    return training_mode


def normalize(data_cfg: Any) -> Settings:
    """`data_cfg` (DictConfig, dict or None) merged over DEFAULTS and validated; a new plain dict."""
    if isinstance(data_cfg, Settings):
        return data_cfg
    given = to_plain(data_cfg) or {}
    if not isinstance(given, Mapping):
        raise ValueError(f"data: expected a mapping of data settings, got {type(given).__name__}")
    cfg = _merge(DEFAULTS, given, "data.")
    for dotted in CHOICES:
        _choice(cfg, dotted)
    bs = cfg["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2:
        raise ValueError(f"data.block_size: expected an integer >= 2, got {bs!r}")
    ev = cfg["eval_examples"]
    if isinstance(ev, bool) or not isinstance(ev, int) or ev < 0:
        raise ValueError(f"data.eval_examples: expected an integer >= 0, got {ev!r}")
    names = cfg["dataset_name"]
    if isinstance(names, str):
        names = [names]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"data.dataset_name: expected a path/name or a list of them, got {cfg['dataset_name']!r}")
    cfg["dataset_name"] = list(names)
    weights = cfg["weights"]
    if weights is not None:
        if isinstance(weights, (int, float)):
            weights = [weights]
        if (not isinstance(weights, (list, tuple)) or len(weights) != len(names)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)
                or sum(weights) <= 0):
            raise ValueError(f"data.weights: expected {len(names)} non-negative numbers (one per entry of "
                             f"data.dataset_name) with a positive sum, got {cfg['weights']!r}")
        cfg["weights"] = [float(w) for w in weights]
    ev_names = cfg["eval_dataset_name"]
    if isinstance(ev_names, str):
        cfg["eval_dataset_name"] = [ev_names]
    elif ev_names is not None and not (isinstance(ev_names, list) and all(isinstance(n, str) for n in ev_names)):
        raise ValueError(f"data.eval_dataset_name: expected null, a path/name or a list, got {ev_names!r}")
    sep = cfg["sft"]["instruction_response_separator"]
    if not isinstance(sep, str):
        raise ValueError(f"data.sft.instruction_response_separator: expected a string, got {sep!r}")
    pad = cfg["sft"]["pad_response_to"]
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"data.sft.pad_response_to: expected an integer >= 0 (0 = off), got {pad!r}")
    for key in ("instruction_field", "response_field"):
        if not isinstance(cfg["sft"]["custom_format"][key], str):
            raise ValueError(f"data.sft.custom_format.{key}: expected a field name, got "
                             f"{cfg['sft']['custom_format'][key]!r}")
    cfg["sft"] = Settings(cfg["sft"])
    return Settings(cfg)


def sft_section(cfg: Any) -> dict:
    """The `data.sft` settings from either the whole data config or its `sft` part, defaults filled."""
    if isinstance(cfg, Settings):
        return cfg["sft"] if "sft" in cfg else cfg
    plain = to_plain(cfg) or {}
    if "sft" in plain or "dataset_name" in plain or "block_size" in plain:
        return normalize(plain)["sft"]
    return normalize({"sft": plain})["sft"]
