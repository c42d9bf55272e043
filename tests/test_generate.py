"""The diffusion sampler: schedules, confidence rules, decoding of a model with known answers, left-padded
mixed-length batches, seeded randomness, and one compiled step graph per generation on XLA."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import load_tokenizer
from model.diffusion import DiffusionConfig
from train.config import ConfigError
from train.generate import (GenerationConfig, confidence, cut_at_stop, filter_logits, generate, generate_ids,
                            hash_uniform, layout, mix32)

TOK = load_tokenizer("byte")
V = TOK.vocab_size
MASK, PAD, IM_END = TOK.mask_id, TOK.pad_id, TOK.im_end_id


class FixedAnswerLM(nn.Module):
    """Stand-in for Qwen3ForDiffusionLM whose predictions are fixed: the token at offset j of the
    generation region is answer[j] with logit margin margins[j] over every other token (the hidden
    state IS the logit vector; logits() is the identity). Each row's prompt length is read from its
    segment ids (real tokens minus the region length), so left padding must be laid out right for the
    answer to land where it belongs. shift: position i-1 predicts token i, as the trained model does."""

    def __init__(self, answer, gen_len, *, shift=True, margins=None, vocab=V):
        super().__init__()
        answer = list(answer) + [IM_END] * (gen_len - len(answer))
        margins = margins if margins is not None else [8.0] * gen_len
        self.register_buffer("answer", torch.tensor(answer[:gen_len], dtype=torch.int64))
        self.register_buffer("margins", torch.tensor(margins, dtype=torch.float32))
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.gen_len, self.shift, self.vocab = gen_len, shift, vocab
        self.calls = 0

    @property
    def lm_head_weight(self):
        return torch.zeros(self.vocab, 1, device=self.anchor.device)

    def forward(self, input_ids, segment_ids, position_ids):
        self.calls += 1
        prompt_len = (segment_ids > 0).sum(1, keepdim=True) - self.gen_len
        offset = (position_ids + (1 if self.shift else 0) - prompt_len).clamp(0, self.gen_len - 1)
        return F.one_hot(self.answer[offset], self.vocab).float() * self.margins[offset][..., None] + self.anchor

    def logits(self, hidden):
        return hidden


class CopyPromptLM(FixedAnswerLM):
    """Answers each row with its own prompt's first tokens (then <|im_end|>): catches rows mixed up
    across batches or misplaced by the padding."""

    def __init__(self, gen_len, copy):
        super().__init__([], gen_len)
        self.copy = copy

    def forward(self, input_ids, segment_ids, position_ids):
        self.calls += 1
        b, length = input_ids.shape
        real = (segment_ids > 0).sum(1, keepdim=True)
        first, prompt_len = length - real, real - self.gen_len  # first real prompt token; prompt length
        offset = (position_ids + 1 - prompt_len).clamp(0, self.gen_len - 1)  # answer offset predicted here
        source = (first + offset).clamp(max=length - 1)
        copy = (offset < self.copy) & (offset < prompt_len)
        tokens = torch.where(copy, input_ids.gather(1, source), torch.full_like(input_ids, IM_END))
        return F.one_hot(tokens, self.vocab).float() * 8.0 + self.anchor


def ids(text):
    return TOK.encode(text)


DIFF = DiffusionConfig(mask_token_id=MASK)


# ---- schedules and configuration ----------------------------------------------------------------

def test_schedule_splits_steps_across_blocks_and_tokens_across_steps():
    cfg = GenerationConfig(max_new_tokens=10, block_length=4, steps=5)
    # blocks [0,4) [4,8) [8,10); 5 steps -> 2, 2, 1; tokens per step as even as possible
    assert cfg.schedule() == [(0, 4, 2), (0, 4, 2), (4, 8, 2), (4, 8, 2), (8, 10, 2)]
    assert GenerationConfig(max_new_tokens=7, steps=3).schedule() == [(0, 7, 3), (0, 7, 2), (0, 7, 2)]
    # never more steps than tokens in a block; default: one token per step, one block
    assert GenerationConfig(max_new_tokens=4, steps=10).schedule() == [(0, 4, 1)] * 4
    assert GenerationConfig(max_new_tokens=3).schedule() == [(0, 3, 1)] * 3
    for cfg in (GenerationConfig(max_new_tokens=16, block_length=8, steps=5),
                GenerationConfig(max_new_tokens=13, block_length=5, steps=13)):
        sched = cfg.schedule()
        per_block = {}
        for start, end, n in sched:
            per_block[(start, end)] = per_block.get((start, end), 0) + n
        assert all(end - start == n for (start, end), n in per_block.items())
        assert sum(per_block.values()) == cfg.max_new_tokens


@pytest.mark.parametrize("bad, key", [
    (dict(steps=1, max_new_tokens=8, block_length=2), "generation.steps"),
    (dict(remasking="lowest"), "generation.remasking"),
    (dict(temperature=-1.0), "generation.temperature"),
    (dict(top_p=0.0), "generation.top_p"),
    (dict(top_k=-2), "generation.top_k"),
    (dict(max_new_tokens=0), "generation.max_new_tokens"),
])
def test_bad_settings_fail_with_one_line_naming_the_key(bad, key):
    with pytest.raises(ConfigError) as err:
        GenerationConfig(**bad)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_from_config_ignores_eval_keys_and_rejects_unknown_ones():
    cfg = GenerationConfig.from_config({"steps": 4, "max_new_tokens": 8, "eval_exact_match_examples": 10},
                                       temperature=None, seed=3)
    assert (cfg.steps, cfg.max_new_tokens, cfg.seed, cfg.temperature) == (4, 8, 3, 0.0)
    with pytest.raises(ConfigError, match="generation.stepz"):
        GenerationConfig.from_config({"stepz": 4})


# ---- pieces ---------------------------------------------------------------------------------------

def test_confidence_rules_on_a_known_distribution():
    p = torch.tensor([0.5, 0.3, 0.2])
    logits = p.log().view(1, 1, 3)
    x0 = torch.zeros(1, 1, dtype=torch.int64)
    assert confidence(logits, x0, "maskgit_plus").item() == pytest.approx(0.5)
    assert confidence(logits, x0, "topk_margin").item() == pytest.approx(0.2)
    assert confidence(logits, x0, "entropy").item() == pytest.approx(float((p * p.log()).sum()))
    # filtered (-inf) entries add nothing to the entropy instead of NaN
    filtered = torch.tensor([[[0.0, float("-inf"), 0.0]]])
    assert confidence(filtered, x0, "entropy").item() == pytest.approx(-np.log(2))


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[[False, False, True, True]]]
    probs = torch.softmax(logits, -1)[0, 0]  # ~0.64, 0.24, 0.09, 0.03
    kept = ~torch.isinf(filter_logits(logits, 0, float(probs[0] + 0.01)))
    assert kept.tolist() == [[[True, True, False, False]]]
    assert (~torch.isinf(filter_logits(logits, 0, 0.1))).sum() == 1  # the top token always stays


def test_hash_noise_is_uniform_and_stable():
    h = mix32(torch.arange(200_000, dtype=torch.int32))
    u = hash_uniform(h)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    # bit-exact against a plain-Python lowbias32 (unsigned 32-bit arithmetic): logical shifts, wrapping
    def lowbias32(v):
        v &= 0xFFFFFFFF
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        v ^= v >> 16
        return v - (1 << 32) if v >= 1 << 31 else v

    values = [0, 1, 2, -1, -7, 123456789, -2**31, 2**31 - 1]
    assert mix32(torch.tensor(values, dtype=torch.int32)).tolist() == [lowbias32(v) for v in values]


def test_layout_left_pads_with_segment_zero_and_restarts_positions():
    x, seg, pos, p_len = layout([[5, 6, 7], [9]], 2, mask_id=MASK, pad_id=PAD, prompt_len=4)
    assert p_len == 4
    assert x.tolist() == [[PAD, 5, 6, 7, MASK, MASK], [PAD, PAD, PAD, 9, MASK, MASK]]
    assert seg.tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert pos.tolist() == [[0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 1, 2]]


def test_cut_at_stop():
    assert cut_at_stop([1, 2, IM_END, 3], (IM_END, PAD)) == [1, 2]
    assert cut_at_stop([1, 2], (IM_END,)) == [1, 2]


# ---- decoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [True, False], ids=["shift", "no_shift"])
@pytest.mark.parametrize("rule", ["maskgit_plus", "topk_margin", "entropy", "random"])
def test_each_rule_decodes_the_known_answer(rule, shift):
    answer = ids("olleh") + [IM_END]
    model = FixedAnswerLM(answer, 8, shift=shift)
    cfg = GenerationConfig(max_new_tokens=8, block_length=4, steps=6, remasking=rule)
    prompts = [ids("Reverse: hello"), ids("Reverse it: hello!!")]
    out = generate_ids(model, prompts, cfg, mask_id=MASK, pad_id=PAD, shift_logits=shift)
    assert out.tolist() == [answer + [IM_END] * 2] * 2
    assert model.calls == 6  # one forward per step: no stop tokens given, no early stop
    diff = DiffusionConfig(mask_token_id=MASK, shift_logits=shift)
    stats = {}
    texts = generate(model, TOK, prompts, cfg, diffusion=diff, stats=stats)
    assert texts == ["olleh", "olleh"] and stats["answer_tokens"] == 10
    # Stopping at the end of the answer: the second block's first step reveals "h" and <|im_end|> (equal
    # margins: the leftmost first), and the answer cannot change after that. Random order may not stop early.
    if rule != "random":
        assert stats["full_steps"] == 4
    full = {}
    assert generate(model, TOK, prompts, dataclasses.replace(cfg, stop_at_eos=False), diffusion=diff,
                    stats=full) == texts
    assert full["full_steps"] == 6 and stats["full_steps"] <= 6


@pytest.mark.parametrize("rule", ["maskgit_plus", "topk_margin", "entropy"])
def test_most_confident_first_and_blocks_left_to_right(rule):
    # margins rise to the right inside each block: the rules must reveal right-to-left within a block,
    # and never touch the second block before the first is complete
    margins = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    model = FixedAnswerLM(ids("abcdefgh"), 8, margins=margins)
    cfg = GenerationConfig(max_new_tokens=8, block_length=4, steps=8, remasking=rule)
    trace = []
    generate_ids(model, [ids("q")], cfg, mask_id=MASK, pad_id=PAD, trace=trace)
    p_len = trace[0].shape[1] - 8
    revealed = [np.flatnonzero(t[0, p_len:] != MASK).tolist() for t in trace]
    assert revealed == [[3], [2, 3], [1, 2, 3], [0, 1, 2, 3],
                        [0, 1, 2, 3, 7], [0, 1, 2, 3, 6, 7], [0, 1, 2, 3, 5, 6, 7], list(range(8))]


def test_mixed_length_batch_keeps_every_prompt_token_intact():
    # Rows of very different prompt lengths, two tokens revealed per step: any write outside a row's
    # own generation region would show up in its prompt or padding.
    torch.manual_seed(0)
    answer = ids("xyz") + [IM_END]
    model = FixedAnswerLM(answer, 6, margins=[3.0, 9.0, 1.0, 5.0, 2.0, 7.0])
    prompts = [ids("a"), ids("a much longer prompt here"), ids("mid length"), ids("bb")]
    cfg = GenerationConfig(max_new_tokens=6, block_length=3, steps=4)  # 2 tokens per step
    trace = []
    out = generate_ids(model, prompts, cfg, mask_id=MASK, pad_id=PAD, trace=trace)
    x0, _, _, p_len = layout(prompts, 6, mask_id=MASK, pad_id=PAD)
    for step, x in enumerate(trace):
        assert np.array_equal(x[:, :p_len], x0[:, :p_len]), f"prompt changed at step {step}"
        # every row has the same number of masks after every step
        assert len(set((x[:, p_len:] == MASK).sum(1).tolist())) == 1
    assert out.tolist() == [answer + [IM_END, IM_END]] * 4


def test_real_model_answers_the_same_alone_and_in_a_mixed_batch():
    from model.config import Qwen3Config
    from model.qwen3 import Qwen3ForDiffusionLM

    torch.manual_seed(1)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=10000.0)
    model = Qwen3ForDiffusionLM(cfg, attention_kernel="naive", loss_kernel="naive")
    with torch.no_grad():  # sharper logits than the 0.02-std init, so argmax ties cannot flip
        model.model.embed_tokens.weight.normal_(0, 1.0)
    prompts = [ids("Sort: cab"), ids("Reverse: a longer word"), ids("x")]
    gen = GenerationConfig(max_new_tokens=6, block_length=3, steps=6, remasking="topk_margin")
    batch = generate_ids(model, prompts, gen, mask_id=MASK, pad_id=PAD)
    for i, p in enumerate(prompts):
        alone = generate_ids(model, [p], gen, mask_id=MASK, pad_id=PAD, prompt_len=len(p))
        assert alone[0].tolist() == batch[i].tolist(), i
    assert (batch != MASK).all()


def test_seeded_sampling_is_reproducible_and_depends_on_the_seed():
    model = FixedAnswerLM(ids("abcdefgh"), 8, margins=[0.5] * 8)  # nearly flat: sampling decides
    prompts = [ids("p1"), ids("prompt 2")]

    def run(seed, rule="maskgit_plus", **kw):
        cfg = GenerationConfig(max_new_tokens=8, steps=4, temperature=1.0, seed=seed, remasking=rule, **kw)
        return generate_ids(model, prompts, cfg, mask_id=MASK, pad_id=PAD).tolist()

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(5, "random") == run(5, "random") != run(6, "random")
    assert run(0)[0] != run(0)[1]  # rows draw different noise
    # top_k=1 leaves one token: sampling becomes greedy whatever the seed
    assert run(0, top_k=1) == run(7, top_k=1) == [ids("abcdefgh")] * 2
    assert MASK not in np.asarray(run(3))  # the MASK token itself is never sampled


def test_many_prompts_in_several_batches_keep_their_order():
    words = ["alpha", "be", "gamma ray", "d", "epsilon", "zeta!", "et"]
    model = CopyPromptLM(6, copy=3)
    cfg = GenerationConfig(max_new_tokens=6, steps=3, batch_size=3, stop_at_eos=False)
    answers = generate(model, TOK, [ids(w) for w in words], cfg, diffusion=DIFF)
    assert answers == [w[:3] for w in words]
    assert model.calls == 3 * 3  # 7 prompts at batch_size 3: three batches (3, 2 and 2 prompts of 3 rows)


def test_empty_prompt_with_shift_is_refused():
    with pytest.raises(ValueError, match="empty prompt"):
        generate_ids(FixedAnswerLM([1], 2), [[]], GenerationConfig(max_new_tokens=2), mask_id=MASK, pad_id=PAD)


# ---- XLA ------------------------------------------------------------------------------------------

def test_one_generation_compiles_once_on_xla(xla_device):
    from model.config import Qwen3Config
    from model.qwen3 import Qwen3ForDiffusionLM
    from train import runtime

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=10000.0)
    model = Qwen3ForDiffusionLM(cfg).to(xla_device)  # reference kernels through call_jax
    runtime.sync()
    gen = GenerationConfig(max_new_tokens=8, block_length=4, steps=8, temperature=0.8, top_p=0.9,
                           remasking="entropy")
    prompts = [ids("Sort: cab"), ids("a longer prompt")]
    counts, outs = [], []
    for seed in (0, 0, 4):
        before = runtime.compile_count()
        outs.append(generate_ids(model, prompts, dataclasses.replace(gen, seed=seed),
                                 mask_id=MASK, pad_id=PAD, device=xla_device))
        counts.append(runtime.compile_count() - before)
    # 8 steps over 2 blocks, another seed: still the one graph compiled by the first generation
    assert counts == [1, 0, 0], counts
    assert outs[0].tolist() == outs[1].tolist() and (outs[0] != MASK).all()


def test_device_noise_is_identical_on_cpu_and_xla(xla_device):
    # The hash generator wraps int32 arithmetic the same way on both: sampled tokens agree exactly.
    x = torch.arange(-5000, 5000, dtype=torch.int32) * 7919
    assert mix32(x).tolist() == mix32(x.to(xla_device)).cpu().tolist()
    cfg = GenerationConfig(max_new_tokens=6, steps=3, temperature=1.0, seed=11, remasking="random")
    prompts = [ids("abc"), ids("de")]
    cpu = generate_ids(FixedAnswerLM(ids("uvwxyz"), 6, margins=[0.3] * 6), prompts, cfg, mask_id=MASK, pad_id=PAD)
    xla = generate_ids(FixedAnswerLM(ids("uvwxyz"), 6, margins=[0.3] * 6).to(xla_device), prompts, cfg,
                       mask_id=MASK, pad_id=PAD, device=xla_device)
    assert cpu.tolist() == xla.tolist()


# ---- faster decoding: parallel unmasking, cached blocks, early stop --------------------------------

def tiny_qwen3(*, causal=False, scan_layers=False, seed=1, kernel="naive"):
    from model.config import Qwen3Config
    from model.qwen3 import Qwen3ForDiffusionLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0)
    model = Qwen3ForDiffusionLM(cfg, attention_kernel=kernel, loss_kernel=kernel, causal=causal,
                                scan_layers=scan_layers)
    with torch.no_grad():  # unit-gain weights: attention moves the hidden states, and logits are sharp
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1.0 if "embed" in name else p.shape[-1] ** -0.5)
    return model.eval()


def packed_rows():
    """Two left-padded rows of one prompt each plus a generation region, as the sampler lays them out."""
    seqs, seg, pos, p_len = layout([ids("Sort: cab"), ids("Reverse: a longer word")], 12,
                                   mask_id=MASK, pad_id=PAD)
    rng = np.random.default_rng(0)
    seqs[:, p_len:] = rng.integers(0, 200, size=seqs[:, p_len:].shape)  # some region tokens revealed
    seqs[:, p_len + 5:] = MASK
    return (torch.as_tensor(seqs), torch.as_tensor(seg), torch.as_tensor(pos)), p_len


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "stacked"])
@pytest.mark.parametrize("window", ["block", "block_and_rest", "one_before_block"])
def test_window_over_recorded_keys_equals_the_full_forward(window, scan_layers):
    # Nothing changed since the keys were recorded: a window's hidden states must be the full
    # forward's at those positions. A window misplaced by one position or keys from the wrong layer fail.
    from model.kv_cache import KVRecorder, KVWindow

    model = tiny_qwen3(scan_layers=scan_layers)
    (x, seg, pos), p_len = packed_rows()
    with torch.no_grad():
        rec = KVRecorder(2)
        full = model(x, seg, pos, kv=rec)
        assert torch.equal(full, model(x, seg, pos))  # recording changes nothing
        lo, hi = {"block": (p_len + 4, p_len + 8), "block_and_rest": (p_len + 4, x.shape[1]),
                  "one_before_block": (p_len + 3, p_len + 8)}[window]
        index = torch.arange(lo, hi)
        part = model(x[:, lo:hi], seg[:, lo:hi], pos[:, lo:hi], kv=KVWindow(rec.keys, rec.values, seg, index))
    torch.testing.assert_close(part, full[:, lo:hi], atol=2e-5, rtol=1e-5)


def test_prefix_cache_is_exact_for_a_causal_model_after_the_window_changes():
    # A causal model's keys before the window do not depend on the window: after the window's tokens
    # change, the window run over the stale record is exactly a fresh full forward there.
    from model.kv_cache import KVRecorder, KVWindow

    model = tiny_qwen3(causal=True)
    (x, seg, pos), p_len = packed_rows()
    lo = p_len + 3
    with torch.no_grad():
        rec = KVRecorder(2)
        model(x, seg, pos, kv=rec)
        x2 = x.clone()
        x2[:, lo:] = torch.as_tensor(np.random.default_rng(1).integers(0, 200, size=x2[:, lo:].shape))
        part = model(x2[:, lo:], seg[:, lo:], pos[:, lo:],
                     kv=KVWindow(rec.keys, rec.values, seg, torch.arange(lo, x.shape[1])))
        torch.testing.assert_close(part, model(x2, seg, pos)[:, lo:], atol=2e-5, rtol=1e-5)
        # the bidirectional model's stale keys are NOT exact: the test above could tell
        bi = tiny_qwen3()
        rec = KVRecorder(2)
        bi(x, seg, pos, kv=rec)
        part = bi(x2[:, lo:], seg[:, lo:], pos[:, lo:],
                  kv=KVWindow(rec.keys, rec.values, seg, torch.arange(lo, x.shape[1])))
        assert not torch.allclose(part, bi(x2, seg, pos)[:, lo:], atol=1e-3)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("shift", [True, False], ids=["shift", "no_shift"])
def test_cache_decodes_as_recomputation_when_nothing_changed_since_the_record(cache, shift):
    model = tiny_qwen3()
    prompts = [ids("Sort: cab"), ids("Reverse: a longer word"), ids("x")]
    # one step per block: every step follows a fresh record, so the cache cannot change a token
    one = GenerationConfig(max_new_tokens=12, block_length=4, steps=3)
    base = generate_ids(model, prompts, one, mask_id=MASK, pad_id=PAD, shift_logits=shift)
    stats = {}
    out = generate_ids(model, prompts, dataclasses.replace(one, cache=cache), mask_id=MASK, pad_id=PAD,
                       shift_logits=shift, stats=stats)
    assert out.tolist() == base.tolist() and stats == {"full_steps": 3, "window_steps": 0}


@pytest.mark.parametrize("shift", [True, False], ids=["shift", "no_shift"])
def test_prefix_cache_decodes_a_causal_model_exactly(shift):
    # one token per step, three of every four steps on the window: exact for a causal model
    model = tiny_qwen3(causal=True)
    prompts = [ids("Sort: cab"), ids("Reverse: a longer word"), ids("x")]
    cfg = GenerationConfig(max_new_tokens=12, block_length=4)
    base = generate_ids(model, prompts, cfg, mask_id=MASK, pad_id=PAD, shift_logits=shift)
    stats = {}
    out = generate_ids(model, prompts, dataclasses.replace(cfg, cache="prefix"), mask_id=MASK, pad_id=PAD,
                       shift_logits=shift, stats=stats)
    assert stats == {"full_steps": 3, "window_steps": 9}
    assert out.tolist() == base.tolist()


def test_threshold_one_decodes_as_the_fixed_schedule():
    model = tiny_qwen3()
    prompts = [ids("Sort: cab"), ids("Reverse: a longer word")]
    base = GenerationConfig(max_new_tokens=8, block_length=4, steps=8, remasking="topk_margin")
    ref = generate_ids(model, prompts, base, mask_id=MASK, pad_id=PAD)
    stats = {}
    out = generate_ids(model, prompts, dataclasses.replace(base, threshold=1.0), mask_id=MASK, pad_id=PAD,
                       stats=stats)
    assert out.tolist() == ref.tolist() and stats["full_steps"] == 8


def _confident(p):
    """The logit margin over V - 1 equal rivals that gives probability p to the answer token."""
    return float(np.log(p * (V - 1) / (1 - p)))


def test_threshold_reveals_every_confident_position_and_at_least_one():
    probs = [0.95, 0.5, 0.97, 0.3, 0.2, 0.99, 0.1, 0.6]
    model = FixedAnswerLM(ids("abcdefgh"), 8, margins=[_confident(p) for p in probs])
    cfg = GenerationConfig(max_new_tokens=8, block_length=4, threshold=0.9)
    trace, stats = [], {}
    out = generate_ids(model, [ids("q")], cfg, mask_id=MASK, pad_id=PAD, trace=trace, stats=stats)
    assert out[0].tolist() == ids("abcdefgh")
    p_len = trace[0].shape[1] - 8
    revealed = [np.flatnonzero(t[0, p_len:] != MASK).tolist() for t in trace]
    # block 1: 0.95 and 0.97 pass; then one per step (0.5, then 0.3). Block 2: 0.99 passes first.
    assert revealed == [[0, 2], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 5], [0, 1, 2, 3, 5, 7],
                        [0, 1, 2, 3, 4, 5, 7], list(range(8))]
    assert stats["full_steps"] == 7


def test_factor_rule_reveals_the_longest_run_that_passes():
    # sorted scores 0.99, 0.9, 0.8, 0.7; factor 1: bounds 1 - 1/2, 1 - 1/3, 1 - 1/4, 1 - 1/5 = .5 .67 .75 .8
    model = FixedAnswerLM(ids("abcd"), 4, margins=[_confident(p) for p in (0.7, 0.99, 0.8, 0.9)])
    cfg = GenerationConfig(max_new_tokens=4, factor=1.0)
    trace = []
    generate_ids(model, [ids("q")], cfg, mask_id=MASK, pad_id=PAD, trace=trace)
    revealed = [np.flatnonzero(t[0, -4:] != MASK).tolist() for t in trace]
    assert revealed == [[1, 2, 3], [0, 1, 2, 3]]  # 0.7 < 0.8 stops the run at three


@pytest.mark.parametrize("bad,key", [(dict(threshold=0.0), "threshold"), (dict(threshold=1.5), "threshold"),
                                     (dict(factor=-1.0), "factor"), (dict(threshold=0.9, factor=1.0), "factor"),
                                     (dict(threshold=0.9, remasking="entropy"), "remasking"),
                                     (dict(cache="both"), "cache"), (dict(stop_at_eos="yes"), "stop_at_eos")])
def test_bad_decoding_options_fail_with_one_line_naming_the_key(bad, key):
    with pytest.raises(ConfigError, match=f"generation.{key}:"):
        GenerationConfig(**bad)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_rows_finishing_at_different_steps_decode_as_they_would_alone(cache):
    model = tiny_qwen3(seed=3)
    prompts = [ids("Sort: cab"), ids("Reverse: a longer word"), ids("x"), ids("another")]
    # stop tokens the random model does produce, so rows stop at different steps
    trial = generate_ids(model, prompts, GenerationConfig(max_new_tokens=16, block_length=4), mask_id=MASK,
                         pad_id=PAD)
    stops = sorted({int(trial[0, 3]), int(trial[2, 6])})
    cfg = GenerationConfig(max_new_tokens=16, block_length=4, threshold=0.2, cache=cache)
    stats = {}
    batch = generate_ids(model, prompts, cfg, mask_id=MASK, pad_id=PAD, stops=stops, prompt_len=24, stats=stats)
    assert stats["full_steps"] + stats["window_steps"] < 16
    ends = []
    for i, p in enumerate(prompts):
        alone = {}
        row = generate_ids(model, [p], cfg, mask_id=MASK, pad_id=PAD, stops=stops, prompt_len=24, stats=alone)
        assert row[0].tolist() == batch[i].tolist(), i
        ends.append(alone["full_steps"] + alone["window_steps"])
    assert len(set(ends)) > 1, ends  # the rows did finish at different steps
    assert max(ends) == stats["full_steps"] + stats["window_steps"]


def test_cached_parallel_decoding_compiles_two_graphs_on_xla_and_matches_cpu(xla_device):
    # The block's first step (whole sequence, keys recorded) and its window steps: one graph each for
    # every block of one size, reused by the next generation; the tokens are those decoded on CPU.
    from train import runtime

    cpu_model = tiny_qwen3(kernel="naive")
    model = tiny_qwen3(kernel="reference").to(xla_device)
    runtime.sync()
    prompts = [ids("Sort: cab"), ids("Reverse: a longer word"), ids("x")]
    cfg = GenerationConfig(max_new_tokens=16, block_length=4, threshold=0.5, cache="dual")
    cpu = generate_ids(cpu_model, prompts, cfg, mask_id=MASK, pad_id=PAD, stops=[IM_END])
    counts = []
    for _ in range(2):
        before, stats = runtime.compile_count(), {}
        out = generate_ids(model, prompts, cfg, mask_id=MASK, pad_id=PAD, device=xla_device, stops=[IM_END],
                           stats=stats)
        counts.append(runtime.compile_count() - before)
        assert out.tolist() == cpu.tolist()
    assert counts == [2, 0], counts
    assert stats["window_steps"] > 0


def test_progress_bar_on_a_terminal_and_the_speed_line(monkeypatch):
    import io
    import sys

    from train.generate import speed_line

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    model = CopyPromptLM(6, copy=3)
    stats = {}
    cfg = GenerationConfig(max_new_tokens=6, steps=3, batch_size=2)
    answers = generate(model, TOK, [ids(w) for w in ["alpha", "be", "gamma"]], cfg, diffusion=DIFF,
                       progress=True, stats=stats)
    assert answers == ["alp", "be", "gam"]
    assert "3/3" in screen.getvalue() and "tokens/s" in screen.getvalue()
    assert stats["answer_tokens"] == 8 and stats["prompts"] == 3 and stats["tokens_per_s"] > 0
    line = speed_line(stats)
    assert line.startswith("3 answers, 8 tokens in ") and "tokens/s" in line
    # not a terminal: no bar at all (logs get the speed line only)
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    generate(model, TOK, [ids("alpha")], cfg, diffusion=DIFF, progress=True)
    assert plain.getvalue() == ""
