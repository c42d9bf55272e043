"""Qwen3 model: Hugging Face parity, packing, presets, meta-device construction."""

import pytest
import torch
from conftest import xla_sync

import kernels
from model import (Qwen3Config, Qwen3ForDiffusionLM, config_from_hf, get_preset, preset_names)
from model.config import PRESETS

TINY = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                   max_position_embeddings=128)


def _hf_model(cfg: Qwen3Config):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.to_hf_config_dict().items()
                                         if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM._from_config(hf_cfg, attn_implementation="eager")
    # Random norm weights too, so a norm applied in the wrong place cannot hide behind ones.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return hf.eval().float()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_match_transformers_qwen3(tied, xla_device):
    cfg = TINY.replace(tie_word_embeddings=tied)
    hf = _hf_model(cfg)
    ours = Qwen3ForDiffusionLM(cfg, causal=True, attention_kernel="naive")
    ours.load_hf_state_dict(hf.state_dict())
    names = set(dict(ours.named_parameters()))
    assert ("lm_head.weight" in names) == (not tied)
    assert "model.layers.1.self_attn.q_norm.weight" in names

    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got_cpu = ours.logits(ours(ids))  # naive backend, plain torch on CPU
    assert (got_cpu - want).abs().max().item() <= 1e-4

    ours_xla = Qwen3ForDiffusionLM(cfg, causal=True, attention_kernel="reference")
    ours_xla.load_hf_state_dict(hf.state_dict())
    ours_xla.to(xla_device)
    with torch.no_grad():
        got_xla = ours_xla.logits(ours_xla(ids.to(xla_device))).cpu()
    assert (got_xla - want).abs().max().item() <= 1e-4


def test_packed_segments_do_not_leak(xla_device):
    """A packed segment's output equals the output for that segment alone; padding is inert."""
    torch.manual_seed(0)
    model = Qwen3ForDiffusionLM(TINY, attention_kernel="reference").to(xla_device)
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, TINY.vocab_size, (5,), generator=gen)
    b = torch.randint(0, TINY.vocab_size, (7,), generator=gen)
    pad = torch.zeros(3, dtype=torch.long)
    ids = torch.stack([torch.cat([a, b, pad]), torch.cat([b, a, a[:3]])])
    seg = torch.tensor([[1] * 5 + [2] * 7 + [0] * 3, [1] * 7 + [2] * 5 + [0] * 3], dtype=torch.int32)
    pos = torch.tensor([list(range(5)) + list(range(7)) + [0] * 3,
                        list(range(7)) + list(range(5)) + [0] * 3], dtype=torch.int32)
    # Row 1's padding holds real tokens (a[:3]) to show padding content cannot leak either.
    with torch.no_grad():
        out = model(ids.to(xla_device), seg.to(xla_device), pos.to(xla_device)).cpu()
        alone_b = model(b[None].to(xla_device)).cpu()[0]
        alone_a = model(a[None].to(xla_device)).cpu()[0]
    torch.testing.assert_close(out[0, 5:12], alone_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :7], alone_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, :5], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 7:12], alone_a, atol=1e-5, rtol=1e-5)


def test_position_ids_are_used():
    """Same tokens, different relative positions -> different outputs (naive backend, CPU)."""
    torch.manual_seed(0)
    model = Qwen3ForDiffusionLM(TINY, attention_kernel="naive")
    ids = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    seg = torch.ones(1, 6, dtype=torch.int32)
    with torch.no_grad():
        base = model(ids, seg, torch.arange(6)[None])
        shifted = model(ids, seg, torch.arange(6)[None] + 9)  # RoPE is relative: same output
        scrambled = model(ids, seg, torch.tensor([[0, 2, 1, 5, 3, 4]]))
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-4)
    assert (scrambled - base).abs().max().item() > 1e-2


def test_bidirectional_sees_the_future_causal_does_not():
    torch.manual_seed(0)
    ids = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % TINY.vocab_size
    for causal in (False, True):
        model = Qwen3ForDiffusionLM(TINY, causal=causal, attention_kernel="naive")
        with torch.no_grad():
            delta = (model(ids) - model(changed))[0, :5].abs().max().item()
        assert (delta == 0.0) if causal else (delta > 1e-3)


def test_init_like_hf():
    torch.manual_seed(0)
    model = Qwen3ForDiffusionLM(TINY.replace(vocab_size=4096, hidden_size=128))
    w = model.model.embed_tokens.weight
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert torch.all(model.model.layers[0].self_attn.q_norm.weight == 1)
    assert torch.all(model.model.norm.weight == 1)
    assert model.lm_head_weight is model.model.embed_tokens.weight
    # embedding_init_std (the CPU demo preset's 1.0) changes the embedding only
    torch.manual_seed(0)
    wide = Qwen3ForDiffusionLM(TINY.replace(vocab_size=4096, hidden_size=128, embedding_init_std=1.0))
    assert abs(wide.model.embed_tokens.weight.std().item() - 1.0) < 0.02
    assert abs(wide.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 1e-3
    with pytest.raises(ValueError, match="embedding_init_std must be positive"):
        TINY.replace(embedding_init_std=0.0).validate()


def test_flex_qwen_1b_builds_on_meta_with_1_7b_parameters():
    cfg = get_preset("flex-qwen-1b")
    assert cfg == PRESETS["qwen3-1.7b"]
    with torch.device("meta"):
        model = Qwen3ForDiffusionLM(cfg)
    n = model.num_parameters()
    assert n == cfg.num_parameters()
    assert 1.70e9 < n < 1.74e9, n
    assert all(p.is_meta for p in model.parameters())
    assert "lm_head.weight" not in model.state_dict()
    with torch.device("meta"):
        untied = Qwen3ForDiffusionLM(get_preset("qwen3-8b"))
    assert "lm_head.weight" in untied.state_dict()
    assert 8.1e9 < untied.num_parameters() < 8.3e9


def test_meta_model_materialises_with_to_empty_and_reset_parameters():
    with torch.device("meta"):
        model = Qwen3ForDiffusionLM(TINY)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    assert torch.all(model.model.norm.weight == 1)
    assert 0.015 < model.model.layers[1].mlp.up_proj.weight.std().item() < 0.025
    with torch.no_grad():
        out = Qwen3ForDiffusionLM(TINY, attention_kernel="naive")
        out.load_state_dict(model.state_dict())
        assert torch.isfinite(out(torch.zeros(1, 4, dtype=torch.long))).all()


def test_presets_match_published_values():
    expected = {  # hidden, intermediate, layers, heads, kv heads, tied
        "qwen3-0.6b": (1024, 3072, 28, 16, 8, True),
        "qwen3-1.7b": (2048, 6144, 28, 16, 8, True),
        "qwen3-4b": (2560, 9728, 36, 32, 8, True),
        "qwen3-8b": (4096, 12288, 36, 32, 8, False),
    }
    for name, (h, i, n, a, kv, tied) in expected.items():
        c = get_preset(name)
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                c.num_key_value_heads, c.tie_word_embeddings) == (h, i, n, a, kv, tied)
        assert (c.vocab_size, c.head_dim, c.rope_theta, c.rms_norm_eps,
                c.max_position_embeddings) == (151936, 128, 1e6, 1e-6, 40960)
    tiny = get_preset("qwen3-tiny")
    assert tiny.vocab_size is None and tiny.with_vocab(320).vocab_size == 320
    with pytest.raises(ValueError, match="vocab_size is not set"):
        Qwen3ForDiffusionLM(tiny)
    assert "flex-qwen-1b" in preset_names()


def test_unknown_preset_and_kernel_errors_are_one_line():
    with pytest.raises(ValueError, match=r"^model: unknown preset 'qwen9'; allowed: qwen3-tiny, "):
        get_preset("qwen9")
    with pytest.raises(ValueError, match="model.attention_kernel='flash'"):
        Qwen3ForDiffusionLM(TINY, attention_kernel="flash")
    m = Qwen3ForDiffusionLM(TINY, attention_kernel="flash_attention", loss_kernel="default")
    assert (m.attention_kernel, m.loss_kernel) == ("pallas", "reference")
    m.set_kernels(attention_kernel="naive", attention_kernel_config={"block_q": 128})
    attn = m.model.layers[1].self_attn
    assert (attn.backend, attn.block_sizes) == ("naive", {"block_q": 128})


def test_hf_config_round_trip():
    transformers = pytest.importorskip("transformers")
    for name in ("qwen3-1.7b", "qwen3-8b"):
        cfg = get_preset(name)
        hf = transformers.Qwen3Config(**{k: v for k, v in cfg.to_hf_config_dict().items()
                                         if k not in ("architectures", "model_type")})
        assert config_from_hf(hf) == cfg
        assert config_from_hf(cfg.to_hf_config_dict()) == cfg
    with pytest.raises(ValueError, match="only Qwen3"):
        config_from_hf({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        config_from_hf({**get_preset("qwen3-0.6b").to_hf_config_dict(),
                        "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_gradient_checkpointing_gives_the_same_gradients(xla_device):
    ids = torch.randint(0, TINY.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    seg = torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.int32)
    results = []
    for device, kernel, ckpt in (("cpu", "naive", False), ("cpu", "naive", True),
                                 (xla_device, "reference", True)):
        torch.manual_seed(0)
        m = Qwen3ForDiffusionLM(TINY, attention_kernel=kernel,
                                gradient_checkpointing=ckpt).to(device)
        m.logits(m(ids.to(device), seg.to(device))).square().mean().backward()
        if device != "cpu":
            xla_sync()  # one graph for all grads, not one per .cpu() below
        results.append({n: p.grad.cpu() for n, p in m.named_parameters()})
    for other in results[1:]:
        for name, g in results[0].items():
            torch.testing.assert_close(other[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_scan_layers_matches_the_layer_loop(xla_device):
    """model.remat.scan_layers: the decoder weights stacked and run as one torch_xla scan, with the
    Pallas attention inside the scanned step (AOTAutograd traces it through its custom ops), plain and
    with per-layer recomputation (min-cut partition): the loss and every gradient match the unrolled
    loop (fp32: loss relative 1e-5, gradients absolute 1e-5)."""
    cfg = TINY.replace(num_hidden_layers=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    seg = torch.tensor([[1] * 32, [1] * 20 + [2] * 8 + [0] * 4], dtype=torch.int32)
    weight = torch.rand(64, generator=torch.Generator().manual_seed(6))
    results = []
    for scan, remat in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        m = Qwen3ForDiffusionLM(cfg, attention_kernel="interpret", scan_layers=scan,
                                gradient_checkpointing=remat).to(xla_device)
        hidden = m(ids.to(xla_device), seg.to(xla_device))
        loss = kernels.masked_cross_entropy(hidden.reshape(-1, cfg.hidden_size), m.lm_head_weight,
                                            ids.reshape(-1).to(xla_device), weight.to(xla_device))
        loss.backward()
        xla_sync()
        grads = {}
        for name, p in m.named_parameters():
            if name in m.stacked_parameter_names():  # [layers, ...] -> the per-layer names
                grads.update({f"model.layers.{i}.{name[13:]}": g for i, g in enumerate(p.grad.cpu())})
            else:
                grads[name] = p.grad.cpu()
        results.append((loss.item(), grads))
    (loss0, grads0) = results[0]
    for loss, grads in results[1:]:
        assert loss == pytest.approx(loss0, rel=1e-5)
        assert sorted(grads) == sorted(grads0)
        for name, g in grads0.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=0, msg=name)


def test_stacked_layers_keep_hugging_face_names():
    """Stacked for scan, the weights still read and write as model.layers.{i}.* (checkpoints, HF
    interop, export), load from an unstacked model's state and back, and the optimizer still exempts
    the (now 2-D) stacked norm scales from weight decay."""
    from train.optim import _param_groups

    torch.manual_seed(0)
    plain = Qwen3ForDiffusionLM(TINY)
    torch.manual_seed(0)
    stacked = Qwen3ForDiffusionLM(TINY, scan_layers=True)
    assert stacked.model.layers.self_attn.q_proj.weight.shape == (2, 64, 64)
    assert "model.layers.self_attn.q_proj.weight" in dict(stacked.named_parameters())
    want, got = plain.state_dict(), stacked.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)  # same init, layer by layer
    other = Qwen3ForDiffusionLM(TINY, scan_layers=True)
    other.load_state_dict(want)
    assert torch.equal(other.model.layers.mlp.up_proj.weight[1], want["model.layers.1.mlp.up_proj.weight"])
    plain.load_state_dict(other.state_dict())
    decay, no_decay = _param_groups(stacked, 0.1)
    assert any(p is stacked.model.layers.input_layernorm.weight for p in no_decay["params"])
    assert all(p is not stacked.model.layers.self_attn.q_norm.weight for p in decay["params"])


@pytest.mark.parametrize("rows", [24, 1040], ids=["few-rows", "many-rows"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_projection_on_xla_cpu_matches_f_linear(xla_device, rows, autocast):
    """model.qwen3.Linear: on XLA:CPU with few rows the product is (W @ x^T)^T behind an optimization
    barrier (XLA's simplifier would turn it back into the slow x @ W^T); output and both gradients
    equal F.linear's on the CPU, in fp32 and under bf16 autocast (which a custom backward must honour)."""
    import torch_xla

    from model.qwen3 import CPU_TRANSPOSED_PRODUCT_MAX_ROWS, Linear

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, rows // 2, 48, generator=gen)
    layer = Linear(48, 80, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(80, 48, generator=gen))
    g = torch.randn(2, rows // 2, 80, generator=gen)

    def run(device):
        lin = Linear(48, 80, bias=False).to(device)
        with torch.no_grad():
            lin.weight.copy_(layer.weight)
        xd = x.detach().to(device).requires_grad_()
        ctx = torch.autocast(device.type if device.type != "xla" else "xla", dtype=torch.bfloat16) \
            if autocast else torch.autocast("cpu", enabled=False)
        with ctx:
            out = lin(xd)
        (out.float() * g.to(device)).sum().backward()
        hlo = torch_xla._XLAC._get_xla_tensors_hlo([out]) if device.type == "xla" else ""
        return out.float().cpu(), xd.grad.cpu(), lin.weight.grad.cpu(), hlo

    want, got = run(torch.device("cpu")), run(xla_device)
    tol = dict(atol=0.15, rtol=0.02) if autocast else dict(atol=1e-4, rtol=1e-5)
    for name, a, b in zip(("output", "d_input", "d_weight"), got[:3], want[:3]):
        torch.testing.assert_close(a, b, msg=name, **tol)
    assert got[0].dtype == torch.float32 and (("bf16" in got[3]) == autocast)
    assert ("opt-barrier" in got[3]) == (rows <= CPU_TRANSPOSED_PRODUCT_MAX_ROWS)
