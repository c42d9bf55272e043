"""What a config builds for training and inference alike: tokenizer, model (with init_from), the diffusion
objective's settings, the precision context, and the host-to-device plumbing of batches and noise.

The trainer, the sampler (train/generate.py), evaluation (train/evaluate.py), export and the ahead-of-time
compile all build from here, so inference code never imports the training loop.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from train import checkpoint as ckpt
from train import runtime, sharding
from train.config import checkpoint_dir


def default_tokenizer_name(preset: str) -> str:
    # A 151,936-row head is too slow to learn on a CPU in minutes; the tiny preset pairs with the
    # byte-level tokenizer, which keeps Qwen3's chat special tokens.
    return "byte" if preset == "qwen3-tiny" else "qwen3"


def build_tokenizer(cfg: DictConfig):
    from data import load_tokenizer
    from train.config import ConfigError

    try:
        return load_tokenizer(cfg.tokenizer_name or default_tokenizer_name(cfg.model.preset))
    except ValueError as err:  # a name that is not a tokenizer: one line, exit 2
        raise ConfigError(str(err)) from None


# Fields that change what a loaded model computes; an explicitly chosen preset must match them.
# (max_position_embeddings and initializer_range do not: RoPE is computed per position, weights are loaded.)
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def hf_init_dir(cfg: DictConfig) -> Path | None:
    """`init_from` when it names a Hugging Face model directory (config.json; not one of our checkpoints)."""
    from model.hf import is_hf_model_dir

    return Path(cfg.init_from).resolve() if cfg.init_from and is_hf_model_dir(cfg.init_from) else None


def _check_explicit_preset(cfg: DictConfig, config, source: str) -> None:
    """A preset chosen on the command line must describe the same model as `source`."""
    from model.config import get_preset
    from train.config import ConfigError

    if not cfg.model.get("preset_explicit"):
        return
    preset = get_preset(cfg.model.preset)
    differ = [f"{name} {getattr(preset, name)} vs {getattr(config, name)}" for name in ARCHITECTURE_FIELDS
              if getattr(preset, name) is not None and getattr(preset, name) != getattr(config, name)]
    if differ:
        raise ConfigError(f"model={cfg.model.preset} disagrees with {source}: {'; '.join(differ)} "
                          f"(drop model= to take the architecture from there)")


def _source_run(cfg: DictConfig) -> tuple[Path, dict] | None:
    """(checkpoint, its saved config) when init_from or resume_from_checkpoint names one of our checkpoints;
    None otherwise (or when there is no such checkpoint yet: _restore reports that)."""
    try:
        if cfg.init_from:
            path = Path(cfg.init_from)
        elif cfg.resume_from_checkpoint is not None:
            path = ckpt.resolve_checkpoint(checkpoint_dir(cfg), cfg.resume_from_checkpoint)
        else:
            return None
        return path, json.loads((path / ckpt.STATE_FILE).read_text()).get("config") or {}
    except (OSError, ValueError, ckpt.CheckpointError):
        return None


def _recorded_run(cfg: DictConfig) -> tuple[Path, dict] | None:
    """_source_run when that run recorded a Hugging Face architecture; None otherwise."""
    found = _source_run(cfg)
    return found if found and (found[1].get("model") or {}).get("architecture") else None


def resolve_hf_init(cfg: DictConfig, log=print) -> None:
    """Take the architecture (and by default the tokenizer) from where the weights come from, when that is
    not a preset: init_from=<Hugging Face dir> (its config.json; the tokenizer is the directory's, else
    qwen3), or a checkpoint, to start from or resume, of a run that began that way (what it recorded).
    Both are written into `cfg` (model.architecture, tokenizer_name), so checkpoints, generation and export
    rebuild the same model. A preset given explicitly on the command line must agree."""
    import dataclasses

    from omegaconf import open_dict

    from model.config import Qwen3Config
    from model.hf import HFCheckpointError, check_hf_dir, read_hf_config

    if cfg.init_from and not Path(cfg.init_from).is_dir():
        raise ckpt.CheckpointError(f"init_from: {cfg.init_from} is not a directory (expected a pallas-dlm checkpoint "
                                   f"or a Hugging Face model directory; download Hub models first, e.g. "
                                   f"huggingface-cli download Qwen/Qwen3-1.7B --local-dir DIR)")
    root = hf_init_dir(cfg)
    if root is None:
        recorded = _recorded_run(cfg)
        if recorded is None:
            return
        path, saved = recorded
        config = Qwen3Config(**saved["model"]["architecture"])
        _check_explicit_preset(cfg, config, str(path / ckpt.STATE_FILE))
        tokenizer = saved.get("tokenizer_name")
        source = f"checkpoint {path}"
    else:
        try:
            config, _ = read_hf_config(root)
            _check_explicit_preset(cfg, config, str(root / "config.json"))
            check_hf_dir(root, config)  # shards, names, shapes, dtypes from the headers, before anything is built
        except HFCheckpointError as err:
            raise ckpt.CheckpointError(f"init_from: {err}") from None
        tokenizer = str(root) if any((root / f).is_file() for f in HF_TOKENIZER_FILES) else "qwen3"
        source = f"Hugging Face Qwen3 directory {root}"
    with open_dict(cfg):
        cfg.model.architecture = dataclasses.asdict(config)
        cfg.tokenizer_name = cfg.tokenizer_name or tokenizer or "qwen3"
    log(f"architecture from {source}: {config.num_hidden_layers} layers x {config.hidden_size}, vocab "
        f"{config.vocab_size}, {'tied' if config.tie_word_embeddings else 'untied'} head; "
        f"tokenizer {cfg.tokenizer_name}")


def model_config(cfg: DictConfig, tokenizer):
    import dataclasses

    from model.config import Qwen3Config, get_preset

    # model.architecture: recorded by resolve_hf_init from a Hugging Face config.json; wins over the preset.
    architecture = cfg.model.get("architecture")
    config = Qwen3Config(**architecture) if architecture else get_preset(cfg.model.preset)
    if architecture and cfg.model.vocab_size and cfg.model.vocab_size != config.vocab_size:
        raise ValueError(f"model.vocab_size: {cfg.model.vocab_size} differs from the {config.vocab_size} rows "
                         f"of init_from's config.json; resizing loaded embeddings is not supported")
    vocab = cfg.model.vocab_size or config.vocab_size or tokenizer.vocab_size
    if vocab < tokenizer.vocab_size:
        from train.config import ConfigError

        raise ConfigError(f"model.vocab_size: {vocab} rows cannot hold tokenizer '{tokenizer.name}' "
                          f"({tokenizer.vocab_size} ids)")
    return dataclasses.replace(config, vocab_size=int(vocab))


def _plain(node):
    return OmegaConf.to_container(node) if node else None


def build_model(cfg: DictConfig, tokenizer, device: torch.device | None = None) -> torch.nn.Module:
    from model.qwen3 import Qwen3ForDiffusionLM
    from train.config import remat_settings

    torch.manual_seed(int(cfg.seed))  # weights are initialised on the host, identically on every rank
    remat = remat_settings(cfg)
    model = Qwen3ForDiffusionLM(
        model_config(cfg, tokenizer),
        causal=bool(cfg.model.causal),
        block_diffusion=objective(cfg) == "bd3lm",
        attention_kernel=cfg.model.attention_kernel,
        loss_kernel=cfg.model.loss_kernel,
        attention_kernel_config=_plain(cfg.model.attention_kernel_config),
        loss_kernel_config=_plain(cfg.model.loss_kernel_config),
        gradient_checkpointing=remat["gradient_checkpointing"],
        scan_layers=remat["scan_layers"],
    )
    model = model.to(device) if device is not None else model
    if remat["optimization_barrier"] and device is not None and device.type == "xla":
        model.add_backward_optimization_barriers()
    return model


def resolve_shift_logits(cfg: DictConfig) -> bool:
    """diffusion.shift_logits, with `auto` decided by where the weights come from: a run from scratch
    predicts each masked token at its own position (False, as LLaDA); init_from an autoregressive model
    keeps its next-token habit (True, the AR-adapted convention); init_from a diffusion model keeps what
    it was trained with (our checkpoint's recorded setting, or an export's `shift_logits`); a resumed run
    keeps its own."""
    value = cfg.diffusion.shift_logits
    if value != "auto":
        return bool(value)
    found = _source_run(cfg)  # our checkpoint: started from, or resumed (a resumed run goes on as it started)
    if found is not None:
        recorded = (found[1].get("diffusion") or {}).get("shift_logits")
    elif cfg.init_from:  # a Hugging Face directory: our export records it; an AR model does not
        try:
            recorded = json.loads((Path(cfg.init_from) / "config.json").read_text()).get("shift_logits")
        except (OSError, ValueError):
            recorded = None
    else:
        return False  # from scratch (or nothing to resume yet: _restore reports it)
    return recorded if isinstance(recorded, bool) else True


def diffusion_config(cfg: DictConfig, tokenizer):
    from model.diffusion import DiffusionConfig
    from model.masking import MaskingConfig

    d = cfg.diffusion
    return DiffusionConfig(
        mask_token_id=int(d.mask_token_id if d.mask_token_id is not None else tokenizer.mask_id),
        sampling_eps=float(d.sampling_eps),
        antithetic=bool(d.antithetic),
        loss_norm=str(d.loss_norm),
        shift_logits=resolve_shift_logits(cfg),
        full_mask_steps=int(d.get("full_mask_steps") or 0),
        masking=MaskingConfig.from_config(d.get("masking"), total_steps=int(cfg.max_steps)),
        objective=objective(cfg),
        block_size=int(d.get("block_size") or 8),
    )


def objective(cfg: DictConfig) -> str:
    """diffusion.objective; runs and checkpoints from before it existed are mdlm."""
    return str((cfg.get("diffusion") or {}).get("objective") or "mdlm")


def noise_generator(*keys: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def batch_to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    # Under SPMD each array is split along the batch over the mesh's data/fsdp axes.
    return {k: sharding.to_device(torch.from_numpy(np.ascontiguousarray(v)), device) for k, v in batch.items()}


def autocast_context(cfg: DictConfig):
    from kernels import tpu as ktpu

    precision = cfg.precision
    if precision == "auto":  # bf16 on a TPU, and when compiling for one ahead of time (train/aot.py)
        precision = "bf16" if runtime.is_tpu() or ktpu.compile_target() is not None else "fp32"
    if precision == "bf16":
        return torch.autocast("xla", dtype=torch.bfloat16)
    return contextlib.nullcontext()
