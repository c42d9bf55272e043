"""Hugging Face interop: a Qwen3 saved by transformers -> init_from -> our checkpoint -> train.export ->
transformers again, bit for bit; tokenizer files equal to ours; clear errors for broken directories.

transformers is imported once for the module (it costs ~10 s here); every model is tiny.
"""

import contextlib
import json
import logging
import warnings

import pytest
import torch
from conftest import xla_sync
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from data import load_tokenizer, render_example, render_prompt  # noqa: E402
from model.hf import (HFCheckpointError, check_hf_dir, is_hf_model_dir, load_hf_model,  # noqa: E402
                      load_hf_state_dict, parse_size, read_hf_config)
from train import export  # noqa: E402
from train.config import ConfigError, load_config  # noqa: E402
from train.trainer import Trainer, resolve_hf_init  # noqa: E402

# vocab 320 = the byte tokenizer's rows, so the bundled data trains on it.
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=128, rms_norm_eps=1e-6)
SMALL = ["global_batch_size=4", "data.block_size=64", "eval_max_batches=1", "logging_steps=1"]


def save_tiny_hf(path, *, tied: bool, max_shard_size=None, seed=0, **changes) -> dict[str, torch.Tensor]:
    """A random Qwen3ForCausalLM saved by transformers itself; returns its state dict."""
    config = transformers.Qwen3Config(**{**TINY, **changes}, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path), **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def transformers_warnings():
    """Collect transformers' WARNING+ log records and Python warnings raised inside the block."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


def from_pretrained_clean(path):
    """AutoModelForCausalLM.from_pretrained, asserting no missing/unexpected/mismatched weights and no warning."""
    with transformers_warnings() as messages:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info
    assert messages == [], messages
    assert type(model).__name__ == "Qwen3ForCausalLM"
    return model.eval()


def _hf_trainer(tmp_path, hf_dir, *extra, log=None):
    cfg = load_config(SMALL + [f"init_from={hf_dir}", "tokenizer_name=byte", f"output_dir={tmp_path / 'run'}",
                               *extra])
    return Trainer(cfg, log=(log.append if log is not None else (lambda *a: None)))


@pytest.mark.parametrize("tied, shard", [(True, None), (False, None), (False, "40KB"), (True, "40KB")],
                         ids=["tied", "untied", "untied-sharded", "tied-sharded"])
def test_round_trip_is_bitwise_and_logits_match(tmp_path, xla_device, tied, shard):
    hf_dir, out = tmp_path / "hf", tmp_path / "export"
    original = save_tiny_hf(hf_dir, tied=tied, max_shard_size=shard)
    assert (hf_dir / "model.safetensors.index.json").is_file() == bool(shard)

    logs: list[str] = []
    trainer = _hf_trainer(tmp_path, hf_dir, log=logs)  # the trainer's own init_from path
    assert any("no resize" in line and "282" in line for line in logs), logs
    assert trainer.model.config.tie_word_embeddings == tied
    checkpoint = trainer.save()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["config"]
    assert saved["model"]["architecture"]["hidden_size"] == 64 and saved["tokenizer_name"] == "byte"

    args = [str(checkpoint), str(out)] + (["--max-shard-size", shard] if shard else [])
    assert export.main(args) == 0
    assert (out / "model.safetensors.index.json").is_file() == bool(shard)
    weight_names = set()
    for file in out.glob("*.safetensors"):
        weight_names |= set(load_file(str(file)))
    assert ("lm_head.weight" in weight_names) == (not tied)  # a tied head is not stored, as HF saves it

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert config["mask_token_id"] == 282 and config["shift_logits"] is True
    assert config["diffusion_loss_norm"] == "maskable" and config["diffusion_attention"] == "bidirectional"

    hf = from_pretrained_clean(out)
    exported = hf.state_dict()
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name

    ours = load_hf_model(out, causal=True, attention_kernel="reference").to(xla_device)
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours.logits(ours(ids.to(xla_device)))
        xla_sync()
    assert (got.cpu() - want).abs().max().item() <= 1e-5


def test_exported_byte_tokenizer_matches_ours(tmp_path):
    ours = load_tokenizer("byte")
    export.write_tokenizer_files(ours, tmp_path, model_max_length=128)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.mask_token_id == ours.mask_id == 282 and hf.eos_token_id == ours.eos_id
    for text in ["plain ascii", "héllo wörld ✓ 你好 😀", "  \n\t mixed\r\n", "<|im_end|> as text"]:
        assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ours.encode(text)
        assert hf.decode(ours.encode(text)) == text
    again = load_tokenizer(str(tmp_path))  # our HF path reading the exported files
    assert again.encode("<think>x</think>") == ours.encode("<think>x</think>")
    assert again.special_ids == ours.special_ids


QWEN_TEXTS = [
    "Hello world", " Hello  world\n\n\tx", "def f(x):\n    return x**2  # square\n", "12345678 3.14159 1e-5",
    "Привет, мир!", "你好，世界。日本語のテキストと한국어", "café naïve résumé", "e\u0301 decomposed accent",
    "emoji 😀👍🏽 family 👨‍👩‍👧", "I'm you'll they've WE'RE it'S", "    leading and trailing   ",
    "\r\n\r\nwindows\r\n", "a" * 300, "x = [1,2,3]; y = {'a': 1}\n\n\n", "ﬁ ligature ＡＢＣ",
    "https://example.com/path?q=1&r=%20", "\u00a0nbsp\u2009thin space\u3000ideographic",
]


@pytest.mark.slow  # ~5 s deriving 151k merges from the ranks, ~3 s loading them in transformers
def test_exported_qwen3_tokenizer_matches_ours(tmp_path):
    ours = load_tokenizer("qwen3")
    export.write_tokenizer_files(ours, tmp_path, model_max_length=40960)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.mask_token_id == 151669 and hf.convert_tokens_to_ids("<|im_end|>") == 151645
    for text in QWEN_TEXTS:
        ids = ours.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf.decode(ids) == ours.decode(ids), text
    # Special-token strings inside text stay text with split_special_tokens, as in our encode.
    literal = "<|im_start|>user<|mask|><think>"
    assert hf(literal, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ours.encode(literal)
    assert hf(literal, add_special_tokens=False)["input_ids"] == [151644, 872, 151669, 151667]

    # The chat template renders what training saw (qwen3 template, thinking off).
    sft = {"template": "qwen3"}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: abc"},
                {"role": "assistant", "content": "cba"}]
    assert hf.apply_chat_template(messages, tokenize=True) == render_example(messages, ours, sft).ids
    assert (hf.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)
            == render_prompt(messages[:2], ours, sft))


def test_command_line_errors_name_the_problem(tmp_path, capsys):
    from train.run import main

    def run(hf_dir):
        code = main(SMALL + [f"init_from={hf_dir}", "tokenizer_name=byte", "max_steps=1",
                             f"output_dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: init_from:") and "\n" not in err, err
        return err

    sharded = tmp_path / "sharded"
    save_tiny_hf(sharded, tied=False, max_shard_size="40KB")
    gone = sorted(sharded.glob("model-*.safetensors"))[1]
    gone.unlink()
    assert f"missing shard file(s) {gone.name}" in run(sharded)

    shapes = tmp_path / "shapes"
    save_tiny_hf(shapes, tied=True)
    config = json.loads((shapes / "config.json").read_text())
    (shapes / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    err = run(shapes)
    assert "model.safetensors: model.layers.0.mlp." in err and "config.json implies" in err
    assert "96" in err and "128" in err

    assert "Qwen/Qwen3-1.7B is not a directory" in run("Qwen/Qwen3-1.7B")

    llama = tmp_path / "llama"
    save_tiny_hf(llama, tied=True)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"],
                                                   "model_type": "llama"}))
    err = run(llama)
    assert "LlamaForCausalLM" in err and "only Qwen3ForCausalLM" in err and "config.json" in err


def test_loader_refuses_broken_directories(tmp_path):
    good = tmp_path / "good"
    state = save_tiny_hf(good, tied=False)
    assert check_hf_dir(good).tie_word_embeddings is False
    # transformers' Trainer writes its own trainer_state.json next to a loadable model: still a HF dir.
    (good / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    assert is_hf_model_dir(good)
    loaded = load_hf_state_dict(good)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)

    def variant(name, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((good / "config.json").read_text())
        if tensors is not None:
            save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    without = variant("missing", {k: v for k, v in state.items() if k != "model.norm.weight"})
    with pytest.raises(HFCheckpointError, match=r"missing 1 tensor\(s\): model.norm.weight"):
        load_hf_state_dict(without)
    no_head = variant("nohead", {k: v for k, v in state.items() if k != "lm_head.weight"})
    with pytest.raises(HFCheckpointError, match="tie_word_embeddings=false, so the head must be stored"):
        load_hf_state_dict(no_head)
    extra = variant("extra", {**state, "score.weight": torch.zeros(2, 64)})
    with pytest.raises(HFCheckpointError, match=r"model.safetensors: 1 unexpected tensor\(s\).*score.weight"):
        load_hf_state_dict(extra)
    ints = variant("ints", {**state, "model.norm.weight": torch.ones(64, dtype=torch.int32)})
    with pytest.raises(HFCheckpointError, match="model.norm.weight has dtype I32, expected a float dtype"):
        check_hf_dir(ints)

    pickled = variant("pickled", None)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFCheckpointError, match="only pickle weights .pytorch_model.bin.; pallas-dlm loads "
                                                "safetensors only"):
        load_hf_state_dict(pickled)

    # Tied config with a stored head: accepted when equal to the embedding, refused otherwise.
    tied_cfg = json.loads((good / "config.json").read_text())
    tied_cfg["tie_word_embeddings"] = True
    same = variant("tied_same", {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()})
    (same / "config.json").write_text(json.dumps(tied_cfg))
    assert "lm_head.weight" not in load_hf_state_dict(same)
    differ = variant("tied_differ", state)
    (differ / "config.json").write_text(json.dumps(tied_cfg))
    with pytest.raises(HFCheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_hf_state_dict(differ)

    # A sharded index may only name plain .safetensors files inside the directory.
    escape = variant("escape", None)
    (escape / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "../good/model.safetensors"}}))
    with pytest.raises(HFCheckpointError, match="is not a .safetensors file in the directory"):
        load_hf_state_dict(escape)

    moe = variant("moe", None)
    (moe / "config.json").write_text(json.dumps({**tied_cfg, "model_type": "qwen3_moe",
                                                 "architectures": ["Qwen3MoeForCausalLM"]}))
    with pytest.raises(HFCheckpointError, match=r"moe/config.json: architectures=\['Qwen3MoeForCausalLM'\]"):
        read_hf_config(moe)


def test_bf16_directory_loads_exactly(tmp_path):
    """Qwen3 releases store bf16: read as stored, widened to fp32 exactly."""
    config = transformers.Qwen3Config(**TINY, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    state = load_hf_state_dict(tmp_path)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    ours = load_hf_model(tmp_path).state_dict()
    for name, tensor in state.items():
        assert ours[name].dtype == torch.float32 and torch.equal(ours[name], tensor.float()), name


def test_explicit_preset_must_agree_with_hf_config(tmp_path):
    hf_dir = tmp_path / "hf"
    save_tiny_hf(hf_dir, tied=True)
    with pytest.raises(ConfigError, match=r"^model=qwen3-0.6b disagrees with .*config.json: vocab_size 151936 vs "
                                          r"320; hidden_size 1024 vs 64; .*drop model="):
        resolve_hf_init(load_config([f"init_from={hf_dir}", "model=qwen3-0.6b"]), log=lambda *a: None)

    # The default preset is not a choice: the directory decides; no tokenizer files there -> qwen3.
    cfg = load_config([f"init_from={hf_dir}"])
    resolve_hf_init(cfg, log=lambda *a: None)
    assert cfg.model.architecture.hidden_size == 64 and cfg.tokenizer_name == "qwen3"

    # A preset that agrees is accepted; the directory's own tokenizer is preferred when it has one.
    tiny = tmp_path / "tiny"
    save_tiny_hf(tiny, tied=True, hidden_size=128, intermediate_size=256, num_hidden_layers=4, head_dim=32,
                 rope_theta=100.0)
    export.write_tokenizer_files(load_tokenizer("byte"), tiny, model_max_length=128)
    cfg = load_config([f"init_from={tiny}", "model=qwen3-tiny"])
    resolve_hf_init(cfg, log=lambda *a: None)
    assert cfg.tokenizer_name == str(tiny.resolve())


def test_runs_started_from_hf_dir_continue_without_repeating_it(tmp_path):
    """A checkpoint of such a run records the architecture and tokenizer: init_from=<it> and
    resume_from_checkpoint rebuild the same model with no model=/tokenizer_name= on the command line."""
    hf_dir = tmp_path / "hf"
    save_tiny_hf(hf_dir, tied=False)
    first = _hf_trainer(tmp_path, hf_dir)
    checkpoint = first.save()
    weights = {k: v.cpu() for k, v in first.model.state_dict().items()}

    quiet = dict(log=lambda *a: None)
    started = Trainer(load_config(SMALL + [f"init_from={checkpoint}", f"output_dir={tmp_path / 'b'}"]), **quiet)
    resumed = Trainer(load_config(SMALL + ["resume_from_checkpoint=latest", f"output_dir={tmp_path / 'run'}"]),
                      **quiet)
    for trainer in (started, resumed):
        assert trainer.tokenizer.name == "byte" and trainer.model.config.hidden_size == 64
        assert not trainer.model.config.tie_word_embeddings
        state = trainer.model.state_dict()
        assert all(torch.equal(state[k].cpu(), v) for k, v in weights.items())
    with pytest.raises(ConfigError, match=r"^model=qwen3-tiny disagrees with .*trainer_state.json: hidden_size 128 "
                                          r"vs 64"):
        Trainer(load_config(SMALL + [f"init_from={checkpoint}", "model=qwen3-tiny"]), **quiet)


def test_directory_tokenizer_is_used_and_exported(tmp_path):
    hf_dir, out = tmp_path / "hf", tmp_path / "export"
    save_tiny_hf(hf_dir, tied=True)
    export.write_tokenizer_files(load_tokenizer("byte"), hf_dir, model_max_length=128)
    cfg = load_config(SMALL + [f"init_from={hf_dir}", f"output_dir={tmp_path / 'run'}"])  # no tokenizer_name
    trainer = Trainer(cfg, log=lambda *a: None)
    assert trainer.tokenizer.name == str(hf_dir.resolve()) and trainer.tokenizer.mask_id == 282
    assert export.main([str(trainer.save()), str(out)]) == 0
    text = "héllo <|im_end|>"
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf(text, split_special_tokens=True)["input_ids"] == load_tokenizer("byte").encode(text)
    assert json.loads((out / "config.json").read_text())["pallas_dlm"]["tokenizer"] == str(hf_dir.resolve())
    # A run on the byte tokenizer renders `prompt=answer<eos>` (template=auto), so its export has no chat
    # template; with template=qwen3 it carries Qwen3's.
    for template, expected in (("auto", False), ("qwen3", True)):
        run = Trainer(load_config(SMALL + [f"data.sft.template={template}", f"output_dir={tmp_path / template}"]),
                      log=lambda *a: None)
        assert export.main([str(run.save()), str(tmp_path / f"export-{template}")]) == 0
        written = json.loads((tmp_path / f"export-{template}" / "tokenizer_config.json").read_text())
        assert ("chat_template" in written) is expected, template


def test_export_refuses_to_clobber_and_parses_sizes(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    save_tiny_hf(hf_dir, tied=True)
    checkpoint = _hf_trainer(tmp_path, hf_dir).save()
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert export.main([str(checkpoint), str(target), "--overwrite"]) == 2
    assert "holds no config.json; refusing to replace it" in capsys.readouterr().err
    assert (target / "notes.txt").read_text() == "keep me"
    out = tmp_path / "out"
    assert export.main([str(tmp_path / "run"), str(out), "--dtype", "bfloat16"]) == 0  # output_dir -> latest
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(str(out / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    assert export.main([str(checkpoint), str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert export.main([str(checkpoint), str(out), "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KiB") == 40960 and parse_size(123) == 123
    with pytest.raises(ValueError, match="expected e.g. 5GB"):
        parse_size("lots")


@pytest.mark.slow
def test_command_line_trains_from_hf_dir_then_exports(tmp_path, capsys):
    from train.run import main

    hf_dir, run_dir, out = tmp_path / "hf", tmp_path / "run", tmp_path / "export"
    original = save_tiny_hf(hf_dir, tied=True)
    assert main([f"init_from={hf_dir}", "training_mode=sft", "tokenizer_name=byte", "max_steps=2",
                 "global_batch_size=4", "data.block_size=64", "eval_max_batches=1", f"output_dir={run_dir}"]) == 0
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed and "no resize" in printed
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    trained = load_file(str(checkpoint / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])

    assert export.main([str(run_dir), str(out)]) == 0
    hf = from_pretrained_clean(out)
    exported = hf.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name
    assert torch.equal(exported["lm_head.weight"], trained["model.embed_tokens.weight"])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_max_steps_zero_imports_the_weights_into_a_checkpoint_bit_for_bit(tmp_path, capsys, tied):
    from safetensors.torch import load_file

    from train.run import main

    hf_dir = tmp_path / "hf"
    original = save_tiny_hf(hf_dir, tied=tied)
    assert main(SMALL + [f"init_from={hf_dir}", "tokenizer_name=byte", "max_steps=0",
                         f"output_dir={tmp_path / 'out'}"]) == 0
    assert "max_steps=0: wrote" in capsys.readouterr().out
    saved = load_file(str(tmp_path / "out" / "checkpoints" / "step-00000000" / "model.safetensors"))
    if tied:
        original.pop("lm_head.weight", None)
    assert set(saved) == set(original)
    for name, value in original.items():
        assert torch.equal(saved[name], value.float()), name
