"""Config composition, the seed's command-line keys, and one-line errors for invalid values."""

import os

import pytest

from train.config import ConfigError, check_batch_and_mesh, load_config
from train.optim import lr_multiplier


def test_defaults_compose_to_the_cpu_demo():
    cfg = load_config([])
    assert cfg.training_mode == "sft"
    assert cfg.model.preset == "qwen3-tiny"
    assert cfg.data.sft.format == "alpaca"
    assert cfg.optimizer.type == "adamw"


def test_seed_command_line_keys_compose():
    # The seed's SFT recipe, with our entry point in place of its script path.
    cfg = load_config(["data=sft", "model=flex-qwen-1b", "training_mode=sft", "data.dataset_name=/tmp/x.json",
                       "data.sft.format=alpaca", "global_batch_size=8", "max_steps=1000",
                       "data.sft.include_system_prompt=false", "data.block_size=2048",
                       "optimizer.type=adafactor", "lr_scheduler.type=linear", "ici_mesh.fsdp=8"])
    assert cfg.model.preset == "flex-qwen-1b"
    assert cfg.global_batch_size == 8 and cfg.max_steps == 1000 and cfg.ici_mesh.fsdp == 8
    assert cfg.data.dataset_name == "/tmp/x.json"


def test_seed_kernel_names_are_aliases():
    cfg = load_config(["model.attention_kernel=flash_attention", "model.loss_kernel=default"])
    assert cfg.model.attention_kernel == "pallas"
    assert cfg.model.loss_kernel == "reference"


@pytest.mark.parametrize("override, key, allowed", [
    ("training_mode=finetune", "training_mode", "sft, pretrain"),
    ("model=qwen9-huge", "model", "qwen3-tiny"),
    ("data.sft.format=yaml", "data.sft.format", "alpaca"),
    ("optimizer.type=sgd", "optimizer.type", "adamw, adafactor"),
    ("lr_scheduler.type=step", "lr_scheduler.type", "cosine"),
    ("diffusion.loss_norm=mean", "diffusion.loss_norm", "maskable"),
    ("diffusion.full_mask_steps=-5", "diffusion.full_mask_steps", "non-negative integer"),
    ("model.attention_kernel=flashy", "model.attention_kernel", "pallas"),
    ("model.remat.scan_layers=layers", "model.remat.scan_layers", "model.layers"),
    ("model.remat.activation_checkpoint_layers=[LlamaDecoderLayer]", "model.remat.activation_checkpoint_layers",
     "Qwen3DecoderLayer"),
])
def test_invalid_values_stop_with_one_line_naming_key_and_allowed(override, key, allowed):
    with pytest.raises((ConfigError, ValueError)) as info:
        cfg = load_config([override])
        # data keys are validated by data/ when the pipeline is built
        from data import build_batch_stream, load_tokenizer

        build_batch_stream(cfg.data, load_tokenizer("byte"), training_mode=cfg.training_mode, batch_size=2, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert key in message and allowed in message


@pytest.mark.parametrize("override, key, allowed", [
    ("optimizer.learning_rate=-1e-3", "optimizer.learning_rate", "> 0"),
    ("optimizer.learning_rate=abc", "optimizer.learning_rate", "'abc'"),
    ("optimizer.learning_rate=nan", "optimizer.learning_rate", "nan"),
    ("optimizer.betas=[1.5,0.9]", "optimizer.betas.0", "< 1"),
    ("optimizer.betas=[0.9]", "optimizer.betas", "two numbers"),
    ("optimizer.weight_decay=-1", "optimizer.weight_decay", ">= 0"),
    ("data.block_size=0", "data.block_size", "integer >= 2"),
    ("data.block_size=-8", "data.block_size", "integer >= 2"),
    ("data.block_size=abc", "data.block_size", "'abc'"),
    ("lr_scheduler.warmup_steps=-5", "lr_scheduler.warmup_steps", "non-negative integer"),
    ("lr_scheduler.min_lr_ratio=5", "lr_scheduler.min_lr_ratio", "<= 1"),
    ("max_grad_norm=-1", "max_grad_norm", "or null"),
    ("seed=x", "seed", "integer"),
    ("save_total_limit=0", "save_total_limit", "positive integer"),
    ("generation.threshold=3", "generation.threshold", "(0, 1]"),
    ("divergence.action=skip_it", "divergence.action", "stop, off"),
])
def test_every_value_is_checked_before_anything_is_built(override, key, allowed, capsys):
    # load_config alone (nothing built) refuses it, and the command line says it in one line, exit 2
    with pytest.raises(ConfigError) as info:
        load_config([override])
    message = str(info.value)
    assert "\n" not in message and message.startswith(key + ":") and allowed in message, message
    from train.run import main

    assert main([override]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}"


def test_unknown_key_is_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(["no_such_key=3"])
    assert "\n" not in str(info.value) and "no_such_key" in str(info.value)


def test_batch_must_divide_over_accumulation_and_data_parallel():
    cfg = load_config(["global_batch_size=10", "gradient_accumulation_steps=4"])
    with pytest.raises(ConfigError, match="global_batch_size: 10 is not divisible"):
        check_batch_and_mesh(cfg, device_count=1)
    cfg = load_config(["global_batch_size=12", "gradient_accumulation_steps=4"])
    assert check_batch_and_mesh(cfg, device_count=1) == 3


def test_mesh_product_must_equal_device_count():
    cfg = load_config(["ici_mesh.fsdp=8"])
    with pytest.raises(ConfigError, match="product of the mesh axes is 8 but 1 device"):
        check_batch_and_mesh(cfg, device_count=1)
    cfg = load_config(["ici_mesh.fsdp=2", "ici_mesh.data=2", "global_batch_size=8"])
    assert check_batch_and_mesh(cfg, device_count=4) == 8


def test_seed_remat_keys_switch_the_model_levers():
    from train.config import remat_settings

    assert remat_settings(load_config([])) == {"gradient_checkpointing": False, "scan_layers": False,
                                               "optimization_barrier": False}
    cfg = load_config(["model.remat.activation_checkpoint_layers=[Qwen3DecoderLayer]",
                       "model.remat.optimization_barrier_layers=[Qwen3DecoderLayer]",
                       "model.remat.scan_layers=model.layers"])
    assert remat_settings(cfg) == {"gradient_checkpointing": True, "scan_layers": True, "optimization_barrier": True}


def test_expert_axis_is_refused_for_a_dense_model():
    from train.sharding import setup_mesh

    with pytest.raises(ConfigError, match="ici_mesh.expert / dcn_mesh.expert: Qwen3 is a dense model"):
        setup_mesh(load_config(["ici_mesh.expert=2"]))


def test_resume_and_init_from_are_exclusive():
    with pytest.raises(ConfigError, match="give one, not both"):
        load_config(["resume_from_checkpoint=latest", "init_from=/tmp/ckpt"])


def test_lr_schedules_warm_up_then_decay_to_floor():
    kw = dict(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert lr_multiplier(0, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, kind="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, kind="cosine", **kw) == pytest.approx(0.55)
    assert lr_multiplier(110, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(60, kind="linear", **kw) == pytest.approx(0.55)
    assert lr_multiplier(109, kind="linear", **kw) == pytest.approx(0.109)
    assert lr_multiplier(500, kind="constant", **kw) == 1.0


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_optimizers_reduce_a_simple_loss_and_skip_decay_on_norms(kind):
    import torch

    from train.optim import build_optimizer

    cfg = load_config([f"optimizer.type={kind}", "optimizer.learning_rate=0.05"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    opt = build_optimizer(model, cfg)
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optimizer.weight_decay, 0.0]
    assert len(opt.param_groups[1]["params"]) == 4  # biases and the norm's scale and shift
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.7 * losses[0]


def test_adamw_matches_torch_adamw_and_reads_its_state():
    """Our multi-tensor AdamW makes torch.optim.AdamW's update (two groups, weight decay on one, a
    learning rate changing every step) and keeps its state layout, so either loads the other's."""
    import copy

    import torch

    from train.optim import AdamW

    def train(cls, steps, state=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
        decay = [model[0].weight, model[2].weight]
        rest = [p for p in model.parameters() if all(p is not d for d in decay)]
        opt = cls([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                  lr=0.01, betas=(0.9, 0.95), eps=1e-8)
        if state is not None:  # copies: load_state_dict keeps references to CPU tensors
            model.load_state_dict(copy.deepcopy(state[0]))
            opt.load_state_dict(copy.deepcopy(state[1]))
        x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.randn(32, 1)
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = 0.01 * (1 - i / 40)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    ours, theirs = train(AdamW, 20)[0], train(torch.optim.AdamW, 20)[0]
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model, opt = train(torch.optim.AdamW, 10)
    assert set(opt.state_dict()["state"][0]) == set(AdamW([torch.nn.Parameter(torch.ones(1))]).init_state(
        torch.ones(1)))
    resumed = train(AdamW, 10, state=(model.state_dict(), opt.state_dict()))[0]
    assert not all(torch.equal(a, b) for a, b in zip(resumed.parameters(), model.parameters()))
    # Bias corrections continue from the loaded step 10: the same 10 more steps in torch's AdamW agree.
    again = train(torch.optim.AdamW, 10, state=(model.state_dict(), opt.state_dict()))[0]
    for a, b in zip(resumed.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adafactor_matches_torch_adafactor_and_reads_its_state():
    """Our device-side Adafactor makes torch.optim.Adafactor's update (factored matrices, a vector, a
    3-D tensor factored over its last two dims, weight decay on one group, a changing learning rate)
    and keeps its state layout, so either loads the other's."""
    import copy

    import torch

    from train.optim import Adafactor

    shapes = [(6, 5), (7,), (3, 4, 5)]

    def train(cls, steps, state=None):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
        opt = cls([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                  lr=0.05)
        if state is not None:
            for p, v in zip(params, state[0]):
                p.data.copy_(v)
            opt.load_state_dict(copy.deepcopy(state[1]))
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = 0.05 * (1 - i / 20)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        return [p.detach() for p in params], opt

    ours, theirs = train(Adafactor, 8)[0], train(torch.optim.Adafactor, 8)[0]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    params, opt = train(torch.optim.Adafactor, 4)
    resumed = train(Adafactor, 4, state=(params, opt.state_dict()))[0]
    again = train(torch.optim.Adafactor, 4, state=(params, opt.state_dict()))[0]
    for a, b in zip(resumed, again):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_adafactor_updates_stacked_layers_as_unstacked():
    """Decoder weights stacked for scan: each layer's row gets exactly the update it would get as a
    separate parameter (per-layer step scale and clipping), matrices and vectors alike."""
    import torch

    from train.optim import Adafactor

    gen = torch.Generator().manual_seed(3)
    layers = [[torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)]
              for _ in range(3)]
    layers[1][0] *= 10  # layers of different scales: a norm over the stack would mix them
    separate = [torch.nn.Parameter(t.clone()) for layer in layers for t in layer]
    stacked = [torch.nn.Parameter(torch.stack([layer[k] for layer in layers])) for k in range(2)]
    opt_sep = Adafactor(separate, lr=0.1)
    opt_stk = Adafactor(stacked, lr=0.1, stacked=stacked)
    for _ in range(3):
        grads = [[torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in layer] for layer in layers]
        for p, g in zip(separate, [g for layer in grads for g in layer]):
            p.grad = g
        for k, p in enumerate(stacked):
            p.grad = torch.stack([layer[k] for layer in grads])
        opt_sep.step()
        opt_stk.step()
    for k in range(2):
        torch.testing.assert_close(stacked[k].detach(), torch.stack([separate[2 * i + k].detach() for i in range(3)]),
                                   rtol=1e-12, atol=1e-12)


def test_adafactor_step_stays_on_the_device(xla_device):
    """On XLA the whole Adafactor update is one graph: nothing is read back to the host (torch's reads
    two norms per parameter, cutting the step into a graph each), and step 2 reuses step 1's graph."""
    import torch
    import torch_xla.debug.metrics as met

    from conftest import xla_sync
    from train.optim import Adafactor, init_optimizer_state

    params = [torch.nn.Parameter(torch.randn(8, 4).to(xla_device)), torch.nn.Parameter(torch.randn(4).to(xla_device))]
    opt = Adafactor(params, lr=0.01, weight_decay=0.1)
    init_optimizer_state(opt)  # as the trainer does: state exists before step 1
    counts = []
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        xla_sync()
        before = met.metric_data("CompileTime")[0] if met.metric_data("CompileTime") else 0
        transfers = met.metric_data("TransferFromDeviceTime")
        transfers = transfers[0] if transfers else 0
        opt.step()
        after_transfers = met.metric_data("TransferFromDeviceTime")
        assert (after_transfers[0] if after_transfers else 0) == transfers  # no host reads inside the step
        xla_sync()
        counts.append(met.metric_data("CompileTime")[0] - before)
    assert counts[1:] == [0, 0], counts  # the update's graph compiles once
    assert all(torch.isfinite(p.cpu()).all() for p in params)


def test_shift_logits_auto_follows_where_the_weights_come_from(tmp_path):
    import json

    from train.trainer import resolve_shift_logits

    assert resolve_shift_logits(load_config([])) is False  # from scratch: each masked position predicts itself
    assert resolve_shift_logits(load_config(["diffusion.shift_logits=true"])) is True
    ar, exported, ours = tmp_path / "ar", tmp_path / "exported", tmp_path / "ours"
    for d in (ar, exported, ours):
        d.mkdir()
    (ar / "config.json").write_text(json.dumps({"model_type": "qwen3"}))  # an autoregressive Qwen3
    (exported / "config.json").write_text(json.dumps({"model_type": "qwen3", "shift_logits": False}))
    (ours / "trainer_state.json").write_text(json.dumps({"config": {"diffusion": {"shift_logits": False}}}))
    assert resolve_shift_logits(load_config([f"init_from={ar}"])) is True
    assert resolve_shift_logits(load_config([f"init_from={exported}"])) is False
    assert resolve_shift_logits(load_config([f"init_from={ours}"])) is False
    assert resolve_shift_logits(load_config([f"init_from={ar}", "diffusion.shift_logits=false"])) is False
    with pytest.raises(ConfigError, match="diffusion.shift_logits: 'maybe'; allowed: auto, true, false"):
        load_config(["diffusion.shift_logits=maybe"])


def test_entry_points_run_malloc_on_huge_pages():
    """train/hostmem.py: a command re-executes itself once with glibc's hugetlb tunable (kept next to
    tunables the user set), and not at all with PALLAS_DLM_HUGEPAGES=0."""
    import subprocess
    import sys

    from train import hostmem

    if not hostmem.wanted() and "GLIBC_TUNABLES" not in os.environ:
        pytest.skip("no glibc with transparent huge pages here")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run = lambda **extra: subprocess.run([sys.executable, "-m", "train.hostmem"], env={**env, **extra},  # noqa: E731
                                         capture_output=True, text=True, check=True).stdout.strip()
    assert run() == "glibc.malloc.hugetlb=1"
    assert run(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert run(PALLAS_DLM_HUGEPAGES="0") == ""


def test_an_unknown_tokenizer_name_is_one_line_and_reaches_for_no_network(capsys, monkeypatch, tmp_path):
    import socket

    from train.run import main

    def no_network(*args, **kwargs):
        raise AssertionError("the network was reached for")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    assert main(["tokenizer_name=no-such-org/no-such-tokenizer", "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: tokenizer_name: 'no-such-org/no-such-tokenizer' is not qwen3")
    (tmp_path / "empty").mkdir()
    assert main([f"tokenizer_name={tmp_path / 'empty'}", "max_steps=1"]) == 2
    assert "a folder without a tokenizer" in capsys.readouterr().err
