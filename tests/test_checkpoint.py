"""Checkpoints are atomic: a crash mid-save leaves the previous checkpoint and `latest` loadable."""

import json

import pytest
import torch

from train import checkpoint as ckpt


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2, bias=False)


def _trained(seed):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.b(model.a(torch.randn(5, 3))).sum().backward()
    opt.step()
    return model, opt


def test_save_load_roundtrip_and_latest(tmp_path):
    model, opt = _trained(0)
    path = ckpt.save_checkpoint(tmp_path, 7, model, opt, {"data": {"epoch": 1, "index": 3}})
    assert path.name == "step-00000007"
    assert ckpt.resolve_checkpoint(tmp_path, "latest") == path
    assert ckpt.resolve_checkpoint(tmp_path, 7) == path
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 7 and loaded.trainer_state["data"] == {"epoch": 1, "index": 3}
    other, other_opt = _trained(1)
    ckpt.load_model_weights(other, loaded.model_state, "test")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    other_opt.load_state_dict(loaded.optimizer_state)
    s1, s2 = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained(0)
    first = ckpt.save_checkpoint(tmp_path, 1, model, opt, {"marker": "first"})

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.torch, "save", crash)  # dies after the weights, before the state file
    with pytest.raises(ckpt.CheckpointError, match=r"saving step 2 failed \(disk full \(simulated\)\); "
                                                   r"the previous checkpoint step-00000001 is kept"):
        ckpt.save_checkpoint(tmp_path, 2, model, opt, {"marker": "second"})
    monkeypatch.undo()
    assert ckpt.resolve_checkpoint(tmp_path, "latest") == first
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".step-")]  # temp folder cleaned
    assert ckpt.load_checkpoint(first).trainer_state["marker"] == "first"


def test_half_written_folder_is_never_chosen(tmp_path):
    model, opt = _trained(0)
    good = ckpt.save_checkpoint(tmp_path, 3, model, opt, {})
    broken = tmp_path / "step-00000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "latest").write_text("step-00000009\n")
    assert ckpt.resolve_checkpoint(tmp_path, "latest") == good
    with pytest.raises(ckpt.CheckpointError, match="available steps: 3"):
        ckpt.resolve_checkpoint(tmp_path, 9)


def test_keep_prunes_oldest(tmp_path):
    model, opt = _trained(0)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]
    assert json.loads((tmp_path / "step-00000004" / "trainer_state.json").read_text())["step"] == 4


def test_mismatched_weights_name_the_tensor(tmp_path):
    model, opt = _trained(0)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, {})
    state = ckpt.load_checkpoint(path).model_state
    state["a.weight"] = torch.zeros(9, 3)
    with pytest.raises(ckpt.CheckpointError, match=r"a.weight has shape \(9, 3\)"):
        ckpt.load_model_weights(Tiny(), state, str(path))
    del state["a.weight"]
    with pytest.raises(ckpt.CheckpointError, match="missing: \\['a.weight'\\]"):
        ckpt.load_model_weights(Tiny(), state, str(path))
