"""SPMD sharding on virtual CPU devices (PJRT_DEVICE=CPU CPU_NUM_DEVICES=4), through the trainer.

SPMD has to be switched on before any XLA tensor exists and this process already has a plain XLA device
(conftest.py), so the sharded runs happen in subprocesses (tests/spmd_worker.py), started once per module:
  - one process on 4 devices: one training step (the tiny 2-layer model, both Pallas kernels in interpret
    mode, 8 rows x 32 tokens) on fsdp=4, data=2 x fsdp=2 and fsdp=2 x tensor=2; the fsdp=4 run saves a
    sharded checkpoint, which a trainer on fsdp=2 x tensor=2 then restores (and a 2-device process on
    fsdp=2, started after it). The partitioned (post-SPMD)
    HLO of every graph it runs is written out (XLA_SAVE_TENSORS_FILE with XLA_DUMP_POST_OPTIMIZATIONS=1).
The one-device step they are compared with runs here, in the test process, on its plain XLA device.

Tolerances (fp32): loss relative 1e-5; gradient norm relative 1e-4; updated parameters absolute 1e-5 (one
AdamW step moves a parameter by at most lr = 2e-3); AdamW first moments absolute 1e-6. Sharded and
one-device steps differ only in the order of floating-point reductions (measured: ~1e-7).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spmd_worker as worker

WORKER = str(Path(worker.__file__).resolve())
B, L, V, HQ, HKV = worker.ROWS, worker.LENGTH, 320, 4, 2

pytestmark = pytest.mark.slow


def _run(mode, out, devices, **env):
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": str(devices), **env}
    return subprocess.Popen([sys.executable, WORKER, mode, str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(proc):
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from train import runtime

    out = tmp_path_factory.mktemp("spmd")
    hlo = out / "hlo.txt"
    steps = _run("steps", out, 4, XLA_SAVE_TENSORS_FILE=str(hlo), XLA_SAVE_TENSORS_FMT="hlo",
                 XLA_DUMP_POST_OPTIMIZATIONS="1")
    if runtime.device_kind() == "CPU":  # the one-device step, here, while the sharded ones run
        from train.trainer import Trainer

        one = worker.one_step(Trainer(worker.config(out / "one", {}), log=lambda *a: None))
    else:  # compare CPU with CPU
        _wait(_run("one", out, 1))
        one = torch.load(out / "one.pt")
    _wait(steps)
    _wait(_run("restore2", out, 2))  # the fsdp=4 checkpoint on a 2-device process, fsdp=2
    sharded = {name: torch.load(out / f"{name}.pt") for name in worker.MESHES}
    hlo_text = "\n".join(p.read_text() for p in sorted(out.glob("hlo.txt*")))
    return {"one": one, "sharded": sharded, "restored": torch.load(out / "restored.pt"),
            "restored_fsdp2": torch.load(out / "restored_fsdp2.pt"), "hlo": hlo_text}


@pytest.mark.parametrize("mesh", list(worker.MESHES))
def test_sharded_step_matches_one_device(runs, mesh):
    one, got = runs["one"], runs["sharded"][mesh]
    assert got["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **worker.MESHES[mesh]}
    assert got["stats"]["loss_positions"] == one["stats"]["loss_positions"] > 0
    assert got["stats"]["loss"] == pytest.approx(one["stats"]["loss"], rel=1e-5)
    assert got["stats"]["grad_norm"] == pytest.approx(one["stats"]["grad_norm"], rel=1e-4)
    for name, want in one["params"].items():
        torch.testing.assert_close(got["params"][name], want, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(got["exp_avg"][name], one["exp_avg"][name], atol=1e-6, rtol=0, msg=name)
    # FSDP really split the parameters (and tensor parallelism the heads / MLP columns).
    spec = got["param_specs"]
    assert spec["model.layers.0.mlp.gate_proj.weight"] != "{replicated}"
    assert spec["model.embed_tokens.weight"] != "{replicated}"


def test_kernels_run_on_shards(runs):
    """Every kernel call enters a manual-sharding region with its global shape and runs on one shard:
    the batch split over data x fsdp, attention heads over tensor."""
    shards = {name: set(r["kernel_shards"]) for name, r in runs["sharded"].items()}
    n = B * L
    for name in ("fsdp4", "data2_fsdp2"):  # 4-way batch split
        assert {f"f32[{B},{HQ},{L},16]", f"f32[{B // 4},{HQ},{L},16]", f"f32[{B // 4},{HKV},{L},16]",
                f"s32[{B // 4},{L}]", f"f32[{n},64]", f"f32[{n // 4},64]", "f32[4]"} <= shards[name], name
    # fsdp=2 x tensor=2: half the rows, half the heads on each device; the cross-entropy's per-shard
    # loss sums come out along a leading axis of 2 (one per batch shard) and are added up outside.
    assert {f"f32[{B // 2},{HQ // 2},{L},16]", f"f32[{B // 2},{HKV // 2},{L},16]", f"f32[{n // 2},64]",
            "f32[2]"} <= shards["fsdp2_tensor2"]


def test_no_all_gather_of_full_logits_or_scores(runs):
    """Post-partitioning HLO of every graph the sharded runs executed: all-gathers only ever assemble
    parameters (FSDP gathers weights), never [B, L, V] logits, [B, H, L, L] scores or anything larger
    than the largest parameter (the [V, H] embedding)."""
    hlo = runs["hlo"]
    assert hlo.count("BEGIN_GRAPH") >= 3 and "all-reduce" in hlo
    gathers = re.findall(r"= [a-z0-9]+\[([0-9,]*)\]\S* all-gather\(", hlo)
    assert gathers, "FSDP should all-gather parameters"
    largest_parameter = V * 64
    for dims in gathers:
        shape = [int(d) for d in dims.split(",") if d]
        assert torch.Size(shape).numel() <= largest_parameter, shape
        assert shape[-2:] != [L, L], shape  # an attention score block
        assert not (V in shape and (B * L in shape or B in shape)), shape  # logits
    for forbidden in (f"[{B},{L},{V}]", f"[{B * L},{V}]", f"[{B},{HQ},{L},{L}]", f"[{B},{HKV},2,{L},{L}]"):
        assert f"{forbidden}" not in "".join(f"[{g}]" for g in gathers)


def test_checkpoint_saved_on_fsdp4_restores_on_fsdp2_and_one_device(runs):
    """Saved by the fsdp=4 run after its step, restored by fsdp=2 x tensor=2 in the same process, by a
    2-device process on fsdp=2 (each device reads its own pieces by global offset) and by
    load_checkpoint on the host (whole tensors)."""
    from train import checkpoint as ckpt

    saved, restored = runs["sharded"]["fsdp4"], runs["restored"]
    path = Path(saved["checkpoint"])
    assert ckpt.is_sharded_checkpoint(path) and not (path / "model.safetensors").exists()
    assert restored["step"] == 1 and restored["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2, "expert": 1}
    for name, want in saved["params"].items():
        assert torch.equal(restored["params"][name], want), name
        assert torch.equal(restored["exp_avg"][name], saved["exp_avg"][name]), name
    # gate_proj [I, H]: columns (I) over tensor, H over fsdp, on the new mesh
    assert restored["param_specs"]["model.layers.0.mlp.gate_proj.weight"].startswith("{devices=[2,2]")
    # ... by a separate 2-device process on fsdp=2, the mesh the run would shrink to
    two = runs["restored_fsdp2"]
    assert two["step"] == 1 and two["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1, "expert": 1}
    for name, want in saved["params"].items():
        assert torch.equal(two["params"][name], want), name
        assert torch.equal(two["exp_avg"][name], saved["exp_avg"][name]), name
    assert two["param_specs"]["model.layers.0.mlp.gate_proj.weight"] != "{replicated}"
    # ... and assembled whole on the host, for a single device, generation or export.
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 1 and loaded.trainer_state["sharded"] is True
    for name, want in saved["params"].items():
        assert torch.equal(loaded.model_state[name], want), name
    assert sorted(loaded.optimizer_state["state"]) == list(range(len(saved["params"])))
