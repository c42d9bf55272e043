"""Qwen3 backbone, its presets and HF config mapping, and the masked-diffusion objective."""

from model.config import (ALIASES, PRESETS, Qwen3Config, config_from_hf, get_preset,
                          preset_names)
from model.diffusion import (LOSS_NORMS, DiffusionConfig, diffusion_loss, draw_noise,
                             maskable_positions, noise_batch)
from model.qwen3 import KERNEL_ALIASES, Qwen3ForDiffusionLM, resolve_kernel

__all__ = [
    "ALIASES", "PRESETS", "Qwen3Config", "config_from_hf", "get_preset", "preset_names",
    "LOSS_NORMS", "DiffusionConfig", "diffusion_loss", "draw_noise", "maskable_positions",
    "noise_batch", "KERNEL_ALIASES", "Qwen3ForDiffusionLM", "resolve_kernel",
]
