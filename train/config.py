"""Configuration: Hydra composition of train/configs plus validation with one-line errors.

`load_config(["key=value", ...])` is what `python -m train.run key=value ...` calls. Every invalid value
stops with a `ConfigError` whose message is a single line naming the key and the allowed values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

TRAINING_MODES = ("sft", "pretrain")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULERS = ("cosine", "linear", "constant")
LOSS_NORMS = ("maskable", "batch", "masked")
PRECISIONS = ("auto", "fp32", "bf16")
KERNELS = ("pallas", "reference", "naive")
KERNEL_ALIASES = {"flash_attention": "pallas", "default": "reference"}
MESH_AXES = ("data", "fsdp", "tensor", "expert")


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line naming the key."""


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose train/configs/config.yaml with command-line style overrides and validate the result."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    for group in ("model", "data"):  # Hydra's own message for a bad group option spans many lines
        for item in overrides:
            if item.startswith(f"{group}=") and item.split("=", 1)[1] not in _group_options(group):
                value = item.split("=", 1)[1]
                what = "preset" if group == "model" else "config"
                raise ConfigError(
                    f"{group}: unknown {what} '{value}'; allowed: {', '.join(_group_options(group))}"
                )
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"invalid override: {first}") from None
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    # Whether the user chose the preset (model=... or model.preset=...) or got the default: init_from=<HF dir>
    # takes the architecture from the directory and only checks it against a preset chosen explicitly.
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.model.preset_explicit = any(item.split("=", 1)[0].lstrip("+~") in ("model", "model.preset")
                                        for item in overrides)
    return cfg


def _choice(cfg: DictConfig, key: str, allowed: Sequence[str], aliases: dict | None = None) -> str:
    value = OmegaConf.select(cfg, key)
    if aliases and value in aliases:
        value = aliases[value]
        OmegaConf.update(cfg, key, value)
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}; allowed: {', '.join(allowed)}")
    return value


def _positive_int(cfg: DictConfig, key: str, allow_zero: bool = False) -> int:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{key}: must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return value


def _real(cfg: DictConfig, key: str, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> None:
    """A finite number within [low, high] (ends open where said); `abc`, nan and inf are refused."""
    import math

    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        allowed = " and ".join(x for x in (lo, hi) if x) or "finite"
        raise ConfigError(f"{key}: must be a number {allowed}{' or null' if allow_none else ''}, got {value!r}")


def _optimizer_and_schedule(cfg: DictConfig) -> None:
    _real(cfg, "optimizer.learning_rate", low=0, low_open=True)
    _real(cfg, "optimizer.weight_decay", low=0)
    _real(cfg, "optimizer.eps", low=0, low_open=True)
    betas = OmegaConf.select(cfg, "optimizer.betas")
    if betas is not None:
        values = list(betas) if OmegaConf.is_list(betas) or isinstance(betas, (list, tuple)) else None
        if values is None or len(values) != 2:
            raise ConfigError(f"optimizer.betas: must be two numbers in [0, 1), got {betas!r}")
        for i in range(2):
            _real(cfg, f"optimizer.betas.{i}", low=0, high=1, high_open=True)
    _positive_int(cfg, "lr_scheduler.warmup_steps", allow_zero=True)
    _real(cfg, "lr_scheduler.min_lr_ratio", low=0, high=1)
    _real(cfg, "max_grad_norm", low=0, allow_none=True)
    limit = cfg.get("save_total_limit")
    if limit is not None:
        _positive_int(cfg, "save_total_limit")
    if cfg.get("eval_max_batches") is not None:
        _positive_int(cfg, "eval_max_batches", allow_zero=True)
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: must be an integer, got {seed!r}")


def _data_and_generation(cfg: DictConfig) -> None:
    """data/ and the sampler check their own keys; here their errors become ConfigErrors before anything
    is built."""
    from data import config as data_config
    from train.generate import GenerationConfig

    try:
        data_config.normalize(cfg.data)
    except ValueError as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    GenerationConfig.from_config(cfg.get("generation"))


def validate(cfg: DictConfig) -> None:
    """Check every enumerated or numeric key we own, and (through data/ and the sampler) theirs."""
    from model.config import get_preset  # model/ raises the one-line preset error itself

    _choice(cfg, "training_mode", TRAINING_MODES)
    _choice(cfg, "optimizer.type", OPTIMIZERS)
    _choice(cfg, "lr_scheduler.type", SCHEDULERS)
    _choice(cfg, "diffusion.loss_norm", LOSS_NORMS)
    _choice(cfg, "precision", PRECISIONS)
    _choice(cfg, "model.attention_kernel", KERNELS, KERNEL_ALIASES)
    _choice(cfg, "model.loss_kernel", KERNELS, KERNEL_ALIASES)
    try:
        get_preset(cfg.model.preset)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for key in ("global_batch_size", "gradient_accumulation_steps", "logging_steps"):
        _positive_int(cfg, key)
    for key in ("max_steps", "save_steps", "eval_steps"):  # max_steps=0: import init_from into a checkpoint
        _positive_int(cfg, key, allow_zero=True)
    _divergence(cfg)
    _optimizer_and_schedule(cfg)
    _data_and_generation(cfg)
    for scope in ("ici_mesh", "dcn_mesh"):
        for axis in MESH_AXES:
            _positive_int(cfg, f"{scope}.{axis}")
    if cfg.resume_from_checkpoint is not None and cfg.init_from is not None:
        raise ConfigError("resume_from_checkpoint and init_from: give one, not both "
                          "(resume continues a run; init_from starts a new one from weights)")
    resume = cfg.resume_from_checkpoint
    if resume is not None and resume != "latest" and not (isinstance(resume, int) and resume >= 0):
        raise ConfigError(f"resume_from_checkpoint: {resume!r}; allowed: null, latest, or a step number")
    _remat(cfg)
    eps = cfg.diffusion.sampling_eps
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ConfigError(f"diffusion.sampling_eps: must be in (0, 1), got {eps!r}")
    shift = cfg.diffusion.shift_logits
    if not (isinstance(shift, bool) or shift == "auto"):
        raise ConfigError(f"diffusion.shift_logits: {shift!r}; allowed: auto, true, false")
    _objective(cfg)
    full = cfg.diffusion.get("full_mask_steps", 0)
    if not (isinstance(full, int) and not isinstance(full, bool) and full >= 0):
        raise ConfigError(f"diffusion.full_mask_steps: must be a non-negative integer, got {full!r}")
    _masking(cfg)


def _masking(cfg: DictConfig) -> None:
    """diffusion.masking.{prefix,truncate,span}: probability and ramp_from in [0, 1], ramp_steps a
    non-negative integer; span.lengths a non-empty list of positive integers, or a list of such lists
    (phases of training). Absent keys keep their defaults (off)."""
    node = cfg.diffusion.get("masking")
    if node is None:
        return
    for kind in ("prefix", "truncate", "span"):
        if node.get(kind) is None:
            continue
        key = f"diffusion.masking.{kind}"
        for name in ("probability", "ramp_from"):
            if node[kind].get(name) is not None or name == "probability":
                _real(cfg, f"{key}.{name}", low=0, high=1)
        if node[kind].get("ramp_steps") is not None:
            _positive_int(cfg, f"{key}.ramp_steps", allow_zero=True)
    lengths = OmegaConf.select(cfg, "diffusion.masking.span.lengths")
    if lengths is None:
        return
    items = OmegaConf.to_container(lengths) if OmegaConf.is_list(lengths) else lengths

    def positive_ints(values):
        return (isinstance(values, list) and len(values) > 0
                and all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in values))

    if not (positive_ints(items) or (isinstance(items, list) and len(items) > 0
                                     and all(positive_ints(phase) for phase in items))):
        raise ConfigError(f"diffusion.masking.span.lengths: must be a non-empty list of positive integers, or a "
                          f"list of such lists (equal phases of max_steps), got {items!r}")


OBJECTIVES = ("mdlm", "bd3lm")


def _objective(cfg: DictConfig) -> None:
    """diffusion.objective and bd3lm's block size (a causal model cannot run the block-diffusion pattern)."""
    if cfg.diffusion.get("objective") is None:
        return
    objective = _choice(cfg, "diffusion.objective", OBJECTIVES)
    if objective == "bd3lm":
        size = _positive_int(cfg, "diffusion.block_size")
        from kernels import BD_MAX_BLOCKS

        if cfg.data.block_size // size >= BD_MAX_BLOCKS:
            raise ConfigError(f"diffusion.block_size: {size} makes {cfg.data.block_size // size} blocks in a "
                              f"row of data.block_size={cfg.data.block_size}; at most {BD_MAX_BLOCKS - 1}")
        if cfg.model.get("causal"):
            raise ConfigError("diffusion.objective: bd3lm needs bidirectional attention inside a block; "
                              "model.causal=true excludes it")


DIVERGENCE_ACTIONS = ("stop", "off", "skip")


def _divergence(cfg) -> None:
    node = cfg.get("divergence")
    if node is None:
        return
    _choice(cfg, "divergence.action", DIVERGENCE_ACTIONS)
    factor = node.get("spike_factor", 0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (factor == 0 or factor > 1):
        raise ConfigError(f"divergence.spike_factor: must be 0 (off) or a number > 1, got {factor!r}")
    if "max_skips" in node:  # absent (a config saved before the key existed): 10
        _positive_int(cfg, "divergence.max_skips")


REMAT_LAYERS = ("Qwen3DecoderLayer",)
SCAN_TARGETS = ("model.layers",)


def _remat(cfg: DictConfig) -> None:
    """model.remat.*: layer-class lists name the decoder layer (the only repeated block); scan_layers
    names the layer list to scan."""
    remat = cfg.model.get("remat") or {}
    for key in ("activation_checkpoint_layers", "optimization_barrier_layers"):
        value = remat.get(key) or []
        if isinstance(value, str):
            value = [value]
        bad = [v for v in value if v not in REMAT_LAYERS]
        if bad or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"model.remat.{key}: unknown layer class {bad[0] if bad else value!r}; "
                              f"allowed: {', '.join(REMAT_LAYERS)} (or an empty list)")
    scan = remat.get("scan_layers")
    if scan is not None and scan not in SCAN_TARGETS:
        raise ConfigError(f"model.remat.scan_layers: unknown value {scan!r}; allowed: null, {', '.join(SCAN_TARGETS)}")


def remat_settings(cfg: DictConfig) -> dict[str, bool]:
    """model.remat.* as the model's switches: gradient_checkpointing, scan_layers, optimization_barrier."""
    remat = cfg.model.get("remat") or {}

    def listed(key):
        value = remat.get(key) or []
        return bool([value] if isinstance(value, str) else list(value))

    return {"gradient_checkpointing": listed("activation_checkpoint_layers"),
            "scan_layers": remat.get("scan_layers") is not None,
            "optimization_barrier": listed("optimization_barrier_layers")}


def mesh_size(cfg: DictConfig, scope: str) -> int:
    size = 1
    for axis in MESH_AXES:
        size *= int(cfg[scope][axis])
    return size


def data_parallel_size(cfg: DictConfig) -> int:
    """Ranks that read different rows: the batch is split over the data and fsdp axes."""
    return int(cfg.ici_mesh.data * cfg.ici_mesh.fsdp * cfg.dcn_mesh.data * cfg.dcn_mesh.fsdp)


def check_batch_and_mesh(cfg: DictConfig, device_count: int) -> int:
    """Check the mesh against the devices and the batch against the mesh; return rows per micro-batch."""
    total = mesh_size(cfg, "ici_mesh") * mesh_size(cfg, "dcn_mesh")
    if total != device_count:
        raise ConfigError(
            f"ici_mesh x dcn_mesh: the product of the mesh axes is {total} but {device_count} device(s) are "
            f"present; set ici_mesh.*/dcn_mesh.* so that they multiply to {device_count}"
        )
    divisor = cfg.gradient_accumulation_steps * data_parallel_size(cfg)
    if cfg.global_batch_size % divisor:
        raise ConfigError(
            f"global_batch_size: {cfg.global_batch_size} is not divisible by gradient_accumulation_steps x "
            f"data-parallel size = {divisor}"
        )
    return cfg.global_batch_size // cfg.gradient_accumulation_steps


def checkpoint_dir(cfg: DictConfig) -> str:
    return cfg.checkpoint_dir or os.path.join(cfg.output_dir, "checkpoints")


def check_writable(cfg: DictConfig) -> None:
    """output_dir and the checkpoint folder exist (created) and take a file: known before anything is
    built, so a run does not train for hours to fail at its first save. A full disk can only show at a
    save (train/checkpoint.py reports it)."""
    for key, path in (("output_dir", cfg.output_dir), ("checkpoint_dir", checkpoint_dir(cfg))):
        probe = Path(path) / f".write-test-{os.getpid()}"
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise ConfigError(f"{key}: cannot write to {path} ({reason})") from None
