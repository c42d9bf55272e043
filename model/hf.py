"""Hugging Face Qwen3 model directories: read them (config.json + safetensors weights) and write them.

A directory holds `config.json` and either `model.safetensors` or a sharded `model.safetensors.index.json`
with the shards it names. Weights are read with safetensors only: nothing from a user path is ever
unpickled (a directory with only `pytorch_model.bin` is refused). Parameter names are HF's
`Qwen3ForCausalLM` names, which our model uses too, so the mapping is the identity; a tied head has no
`lm_head.weight` (an `lm_head.weight` equal to the embedding is accepted and dropped).

Every problem stops with one line naming the file and the tensor or field: a missing shard, a tensor
missing, unexpected or of the wrong shape, another architecture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from model.config import Qwen3Config, config_from_hf

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_ARCHITECTURE = "Qwen3ForCausalLM"
# Our own checkpoints (train/checkpoint.py) hold this file, with the step and the run's config.
TRAINER_STATE_FILE = "trainer_state.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size (5 GB)
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


class HFCheckpointError(ValueError):
    """A Hugging Face directory we cannot load; the message is one line naming the file and problem."""


def _is_pallas_checkpoint(path: Path) -> bool:
    # Ours records the step and the run's config; transformers' Trainer also writes a trainer_state.json
    # (global_step, log_history) next to a loadable config.json + model.safetensors.
    try:
        state = json.loads((path / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "step" in state and "config" in state


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    """True for a directory with config.json that is not one of our checkpoints."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG_FILE).is_file() and not _is_pallas_checkpoint(p)


def read_hf_config(path: str | os.PathLike) -> tuple[Qwen3Config, dict[str, Any]]:
    """(architecture, the raw config.json dict) of a Hugging Face Qwen3 directory."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise HFCheckpointError(f"{file}: not found (a Hugging Face model directory needs config.json)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise HFCheckpointError(f"{file}: unreadable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise HFCheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures") or []
    if archs and HF_ARCHITECTURE not in archs:
        raise HFCheckpointError(f"{file}: architectures={archs!r}, model_type={raw.get('model_type')!r}; "
                                f"only {HF_ARCHITECTURE} (model_type 'qwen3') is supported")
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?") if isinstance(
            raw["quantization_config"], dict) else "?"
        raise HFCheckpointError(f"{file}: quantized checkpoints (quant_method={method!r}) are not supported; "
                                f"use the unquantized bf16/fp32 release")
    try:
        config = config_from_hf(raw)
    except ValueError as err:
        raise HFCheckpointError(f"{file}: {str(err).removeprefix('model: ')}") from None
    return config, raw


def hf_weight_files(path: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a directory and, when sharded, the index's tensor -> file map."""
    root = Path(path)
    index_file, single = root / INDEX_FILE, root / WEIGHTS_FILE
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HFCheckpointError(f"{index_file}: not a safetensors index ({type(err).__name__}: {err})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise HFCheckpointError(f"{index_file}: weight_map must map tensor names to file names")
        names = sorted(set(weight_map.values()))
        for name in names:  # shards are plain file names inside the directory, nothing else
            if Path(name).name != name or name in (".", "..") or not name.endswith(".safetensors"):
                raise HFCheckpointError(f"{index_file}: shard name {name!r} is not a .safetensors file "
                                        f"in the directory")
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise HFCheckpointError(f"{index_file}: missing shard file(s) {', '.join(missing)} "
                                    f"({len(missing)} of {len(names)})")
        return [root / n for n in names], dict(weight_map)
    if single.is_file():
        return [single], None
    pickled = [n for n in _PICKLE_WEIGHTS if (root / n).is_file()]
    if pickled:
        raise HFCheckpointError(
            f"{root}: only pickle weights ({pickled[0]}); pallas-dlm loads safetensors only, never unpickling "
            f"a user file. Convert it where you trust the file, e.g. "
            f"AutoModelForCausalLM.from_pretrained(d).save_pretrained(out, safe_serialization=True)")
    raise HFCheckpointError(f"{root}: no {WEIGHTS_FILE} or {INDEX_FILE}")


@dataclass(frozen=True)
class TensorEntry:
    """What a safetensors header says about one tensor, and which file holds it."""

    shape: tuple[int, ...]
    dtype: str  # safetensors names: F32, BF16, F16, ...
    file: str


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _read_headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, TensorEntry]:
    """Names, shapes and dtypes of every tensor (headers only: no tensor data is read), checked against
    the index when there is one."""
    from safetensors import SafetensorError, safe_open

    entries: dict[str, TensorEntry] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name in entries:
                        raise HFCheckpointError(f"{file}: tensor {name} also appears in {entries[name].file}")
                    if weight_map is not None and weight_map.get(name) != file.name:
                        placed = f"places in {weight_map[name]}" if name in weight_map else "does not list"
                        raise HFCheckpointError(f"{file}: holds {name}, which {INDEX_FILE} {placed}")
                    view = f.get_slice(name)
                    entries[name] = TensorEntry(tuple(view.get_shape()), str(view.get_dtype()), file.name)
        except (SafetensorError, OSError) as err:
            raise HFCheckpointError(f"{file}: unreadable safetensors file ({err})") from None
    if weight_map is not None:
        absent = sorted(n for n in weight_map if n not in entries)
        if absent:
            raise HFCheckpointError(f"{files[0].parent / INDEX_FILE}: lists {len(absent)} tensor(s) absent from "
                                    f"their shard, e.g. {absent[0]} (in {weight_map[absent[0]]})")
    return entries


def expected_shapes(config: Qwen3Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `Qwen3ForCausalLM` saves for this config (tied: no lm_head.weight).

    Taken from our own model built on the meta device, so reading and the model cannot disagree."""
    from model.qwen3 import Qwen3ForDiffusionLM

    with torch.device("meta"):
        model = Qwen3ForDiffusionLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_entries(entries: Mapping[str, TensorEntry], config: Qwen3Config, source: str) -> None:
    """Every expected tensor present with its shape and a float dtype, nothing else (a tied head may
    also be stored: its values are compared once loaded)."""
    want = expected_shapes(config)
    want_extra = {"lm_head.weight": want["model.embed_tokens.weight"]} if config.tie_word_embeddings else {}

    def at(name: str) -> str:
        return f"{source}/{entries[name].file}" if entries[name].file else source

    missing = [n for n in want if n not in entries]
    if missing:
        hint = (" (config.json has tie_word_embeddings=false, so the head must be stored)"
                if missing == ["lm_head.weight"] else "")
        raise HFCheckpointError(f"{source}: missing {len(missing)} tensor(s): {', '.join(missing[:4])}"
                                f"{', ...' if len(missing) > 4 else ''}{hint}")
    unexpected = [n for n in entries if n not in want and n not in want_extra]
    if unexpected:
        more = ", ..." if len(unexpected) > 4 else ""
        raise HFCheckpointError(f"{at(unexpected[0])}: {len(unexpected)} unexpected tensor(s) for "
                                f"{HF_ARCHITECTURE}: {', '.join(unexpected[:4])}{more}")
    for name, entry in entries.items():
        shape = want.get(name, want_extra.get(name))
        if entry.shape != shape:
            raise HFCheckpointError(f"{at(name)}: {name} has shape {entry.shape} but config.json implies {shape}")
        if entry.dtype not in _FLOAT_DTYPES:
            raise HFCheckpointError(f"{at(name)}: {name} has dtype {entry.dtype}, expected a float dtype")


def _drop_tied_head(state: dict[str, torch.Tensor], config: Qwen3Config, source: str) -> dict[str, torch.Tensor]:
    if config.tie_word_embeddings and "lm_head.weight" in state:
        head, emb = state.pop("lm_head.weight"), state["model.embed_tokens.weight"]
        if not torch.equal(head, emb):
            raise HFCheckpointError(f"{source}: lm_head.weight differs from model.embed_tokens.weight but "
                                    f"config.json has tie_word_embeddings=true")
    return state


def check_state_dict(state: Mapping[str, torch.Tensor], config: Qwen3Config,
                     source: str) -> dict[str, torch.Tensor]:
    """In-memory weights validated like a directory's; returns them without a tied `lm_head.weight`."""
    entries = {}
    for name, t in state.items():
        dtype = "F32" if t.is_floating_point() else str(t.dtype)  # only float-ness matters here
        entries[name] = TensorEntry(tuple(t.shape), dtype, "")
    _check_entries(entries, config, source)
    return _drop_tied_head(dict(state), config, source)


def check_hf_dir(path: str | os.PathLike, config: Qwen3Config | None = None) -> Qwen3Config:
    """Validate a directory without reading tensor data: config.json is Qwen3, every shard is present,
    every tensor has the right name, shape and a float dtype. Returns the config checked against
    (`config`, or the directory's own)."""
    root = Path(path)
    if config is None:
        config, _ = read_hf_config(root)
    files, weight_map = hf_weight_files(root)
    _check_entries(_read_headers(files, weight_map), config, str(root))
    return config


def load_hf_state_dict(path: str | os.PathLike,
                       config: Qwen3Config | None = None) -> dict[str, torch.Tensor]:
    """The validated weights of a Hugging Face Qwen3 directory, by HF name, in their stored dtype.

    `config` defaults to the directory's own config.json; pass the model's config to check the weights
    against the model they will be loaded into. Everything is checked from the headers before any tensor
    data is read."""
    from safetensors import safe_open

    root = Path(path)
    if config is None:
        config, _ = read_hf_config(root)
    files, weight_map = hf_weight_files(root)
    entries = _read_headers(files, weight_map)
    _check_entries(entries, config, str(root))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name)
    return _drop_tied_head(state, config, str(root))


def load_hf_model(path: str | os.PathLike, **model_kwargs):
    """A `Qwen3ForDiffusionLM` (fp32) with the weights of a Hugging Face directory; kwargs go to the
    model (causal, attention_kernel, ...)."""
    from model.qwen3 import Qwen3ForDiffusionLM

    config, _ = read_hf_config(path)
    state = load_hf_state_dict(path, config)
    with torch.device("meta"):  # no random init: every tensor is overwritten below
        model = Qwen3ForDiffusionLM(config, **model_kwargs)
    model.to_empty(device="cpu")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model


# ---- writing -----------------------------------------------------------------------------------

def _shards(names: Iterable[str], state: Mapping[str, torch.Tensor], limit: int) -> list[list[str]]:
    """Greedy, in model order: a new shard starts when the next tensor would pass `limit` bytes."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_hf_model(state: Mapping[str, torch.Tensor], config: Qwen3Config, out_dir: str | os.PathLike, *,
                  extra_config: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write config.json and safetensors weights that `Qwen3ForCausalLM.from_pretrained` loads.

    `state` uses HF names (our model's state_dict); it is validated against `config` first. A tied
    head is saved as transformers saves it: no lm_head.weight. Weights larger than `max_shard_bytes`
    are split into `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
    `dtype` casts floating tensors (None keeps them bit for bit). Returns the files written."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = check_state_dict({k: v.detach().to("cpu") for k, v in state.items()}, config, str(out))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    dtypes = {v.dtype for v in state.values()}
    dtype_name = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    names = list(expected_shapes(config))  # model order: embedding, layers, norm, head
    # transformers >= 4.56 reads `dtype`, older releases `torch_dtype`; both load without a warning.
    hf = config.to_hf_config_dict(dtype=dtype_name, torch_dtype=dtype_name, **dict(extra_config or {}))
    written = [out / CONFIG_FILE]
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    shards = _shards(names, state, int(max_shard_bytes))
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file({n: state[n].contiguous() for n in names}, str(out / WEIGHTS_FILE), metadata=meta)
        return written + [out / WEIGHTS_FILE]
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n].contiguous() for n in shard}, str(out / file), metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
        written.append(out / file)
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return written + [out / INDEX_FILE]


def parse_size(value: str | int) -> int:
    """'5GB', '500MB', '64KiB' or a byte count -> bytes (decimal units like transformers, binary for *iB)."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            break
    else:
        number, scale = text, 1
    try:
        size = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"size {value!r}: expected e.g. 5GB, 500MB or a byte count") from None
    if size <= 0:
        raise ValueError(f"size {value!r}: must be positive")
    return size
