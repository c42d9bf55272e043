"""Runs in a subprocess of tests/test_spmd.py, with PJRT_DEVICE=CPU CPU_NUM_DEVICES=<n>: SPMD must be
switched on before any XLA tensor exists, and the pytest process already has a plain XLA device.

    python tests/spmd_worker.py steps OUT   # 4 devices: one training step on three meshes; the fsdp=4 run
                                            # saves a sharded checkpoint, restored on fsdp=2 x tensor=2
    python tests/spmd_worker.py one   OUT   # 1 device: the unsharded step

Results go to OUT as torch.save files for the test to compare against its own one-device step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The tiny model every SPMD test uses: 2 layers, hidden 64, 4 query / 2 key-value heads of 16, the byte
# tokenizer's 320-row vocabulary; 8 rows of 32 tokens; both Pallas kernels (interpret mode on CPU).
ARCHITECTURE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                    tie_word_embeddings=True, max_position_embeddings=128)
ROWS, LENGTH = 8, 32
# optimizer.eps=1e-3: the first AdamW update is lr * g / (|g| + eps); with the default eps it is
# lr * sign(g), and a gradient within rounding of zero could flip sign between two reduction orders.
OVERRIDES = [f"global_batch_size={ROWS}", f"data.block_size={LENGTH}", "eval_max_batches=0", "max_steps=4",
             "generation.eval_exact_match_examples=0", "model.attention_kernel=pallas",
             "model.loss_kernel=pallas", "data.sft.template=separator", "data.sft.pad_response_to=0",
             "tokenizer_name=byte", "optimizer.eps=1e-3", "lr_scheduler.warmup_steps=0", "save_total_limit=null"]
MESHES = {"fsdp4": {"fsdp": 4}, "data2_fsdp2": {"data": 2, "fsdp": 2}, "fsdp2_tensor2": {"fsdp": 2, "tensor": 2}}
RESTORE_MESH = {"fsdp": 2, "tensor": 2}


def config(output_dir, mesh: dict, *extra):
    from omegaconf import open_dict

    from train.config import load_config

    cfg = load_config(OVERRIDES + [f"output_dir={output_dir}"] + [f"ici_mesh.{a}={n}" for a, n in mesh.items()]
                      + list(extra))
    with open_dict(cfg):
        cfg.model.architecture = dict(ARCHITECTURE)
    return cfg


def one_step(trainer) -> dict:
    """Run one optimizer step; its stats and the updated parameters and AdamW moments, on the host."""
    import torch_xla

    from train import runtime

    stats, _ = trainer.train_step()
    runtime.sync()
    trainer.step += 1
    return {"stats": {k: float(v.item()) for k, v in stats.items()},
            "params": {n: p.detach().cpu() for n, p in trainer.model.named_parameters()},
            "exp_avg": {n: trainer.optimizer.state[p]["exp_avg"].cpu() for n, p in trainer.model.named_parameters()},
            "param_specs": {n: torch_xla._XLAC._get_xla_sharding_spec(p) for n, p in trainer.model.named_parameters()}}


def kernel_shards(trainer) -> list[str]:
    """The shapes entering and leaving manual-sharding regions in one forward + backward (traced, not
    run): every kernel call goes from the global shape to the one shard each device computes on."""
    import re

    import torch_xla

    from model.diffusion import diffusion_loss
    from train.trainer import batch_to_device

    batch = batch_to_device(next(trainer.stream), trainer.device)
    t = torch.full((ROWS,), 0.5, device=trainer.device)
    u = torch.rand(ROWS, LENGTH).to(trainer.device)
    loss, _ = diffusion_loss(trainer.model, batch, t, u, trainer.diff_cfg)
    loss.backward()
    ir = torch_xla._XLAC._get_xla_tensors_text([loss, *(p.grad for p in trainer.model.parameters())])
    trainer.optimizer.zero_grad(set_to_none=True)
    return re.findall(r"= (\w+\[[0-9,]*\])\S* xla::custom_sharding", ir)


def steps(out: Path) -> None:
    from train.trainer import Trainer

    for name, mesh in MESHES.items():
        trainer = Trainer(config(out / name, mesh), log=lambda *a: None)
        result = one_step(trainer)
        result["mesh"] = {a: int(n) for a, n in trainer.mesh.shape().items()}
        if name == "fsdp4":
            result["checkpoint"] = str(trainer.save())
        result["kernel_shards"] = kernel_shards(trainer)
        torch.save(result, out / f"{name}.pt")
    restore(out)


def one(out: Path) -> None:
    """The one-device step (the test process runs it itself when its device is the CPU)."""
    from train.trainer import Trainer

    torch.save(one_step(Trainer(config(out / "one", {}), log=lambda *a: None)), out / "one.pt")


def restore(out: Path, mesh: dict = RESTORE_MESH, name: str = "restored") -> None:
    """A trainer on another mesh (default fsdp=2 x tensor=2) resuming the fsdp=4 run's checkpoint."""
    import torch_xla

    from train.trainer import Trainer

    saved = torch.load(out / "fsdp4.pt")
    ckpt_dir = Path(saved["checkpoint"]).parent
    trainer = Trainer(config(out / name, mesh, f"checkpoint_dir={ckpt_dir}",
                             "resume_from_checkpoint=latest"), log=lambda *a: None)
    torch.save({"step": trainer.step, "mesh": {a: int(n) for a, n in trainer.mesh.shape().items()},
                "params": {n: p.detach().cpu() for n, p in trainer.model.named_parameters()},
                "exp_avg": {n: trainer.optimizer.state[p]["exp_avg"].cpu()
                            for n, p in trainer.model.named_parameters()},
                "param_specs": {n: torch_xla._XLAC._get_xla_sharding_spec(p)
                                for n, p in trainer.model.named_parameters()}},
               out / f"{name}.pt")


def restore_on_two(out: Path) -> None:
    """The same checkpoint restored by a 2-device process on fsdp=2 (CPU_NUM_DEVICES=2)."""
    restore(out, {"fsdp": 2}, "restored_fsdp2")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    {"steps": steps, "one": one, "restore2": restore_on_two}[mode](out)
    print(json.dumps({"ok": mode, "devices": os.environ.get("CPU_NUM_DEVICES")}))
