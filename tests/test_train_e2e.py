"""End to end on the XLA CPU device: the trainer trains, logs, checkpoints, resumes exactly, starts from
weights, compiles its step once, and runs from the command line on every data format."""

import json

import pytest

from train import runtime
from train.config import load_config
from train.metrics import read_metrics
from train.trainer import Trainer

pytestmark = pytest.mark.slow

# Small and fast: 4 rows of 64 tokens, one held-out batch, no generation (tests/test_evaluate.py covers it).
SMALL = ["global_batch_size=4", "data.block_size=64", "eval_max_batches=1", "logging_steps=1",
         "lr_scheduler.warmup_steps=2", "generation.eval_exact_match_examples=0"]


def _cfg(tmp_path, name, *extra):
    return load_config(SMALL + [f"output_dir={tmp_path / name}", *extra])


def _quiet(*args, **kwargs):
    pass


def test_sft_run_logs_checkpoints_and_plots(tmp_path):
    result = Trainer(_cfg(tmp_path, "run", "max_steps=4"), log=_quiet).fit()
    out = tmp_path / "run"
    assert result.steps_done == 4 and sorted(result.step_losses) == [1, 2, 3, 4]
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("train/loss", "train/ppl", "train/step_time", "train/lr", "train/grad_norm",
                "train/loss_positions", "train/tokens_per_s"):
        assert all(r[key] is not None and r[key] >= 0 for r in train), key
    assert train[0]["train/lr"] < train[1]["train/lr"]  # warmup
    assert result.initial_eval["eval/loss"] > 0 and result.final_eval["eval/loss"] > 0
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert list((out / "tensorboard").iterdir())
    assert result.checkpoint.name == "step-00000004"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"


def test_resume_reproduces_the_unbroken_run(tmp_path):
    unbroken = Trainer(_cfg(tmp_path, "a", "max_steps=6", "save_steps=3", "save_total_limit=null"),
                       log=_quiet).fit()
    ckpts = tmp_path / "a" / "checkpoints"
    resumed = Trainer(_cfg(tmp_path, "b", "max_steps=6", f"checkpoint_dir={ckpts}", "resume_from_checkpoint=3"),
                      log=_quiet).fit()
    assert sorted(resumed.step_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.step_losses[step] == pytest.approx(unbroken.step_losses[step], rel=1e-6, abs=1e-7), step
    assert resumed.final_eval["eval/loss"] == pytest.approx(unbroken.final_eval["eval/loss"], rel=1e-6)


def test_init_from_takes_weights_only(tmp_path):
    first = Trainer(_cfg(tmp_path, "a", "max_steps=3"), log=_quiet).fit()
    second = Trainer(_cfg(tmp_path, "b", "max_steps=2", f"init_from={first.checkpoint}"), log=_quiet)
    assert second.step == 0  # fresh step, schedule and optimizer
    assert all(not v["exp_avg"].abs().sum().item() for v in second.optimizer.state.values())
    result = second.fit()
    # Same held-out batches and noise: the new run starts where the first one ended.
    assert result.initial_eval["eval/loss"] == pytest.approx(first.final_eval["eval/loss"], rel=1e-6)
    assert sorted(result.step_losses) == [1, 2]


def test_step_compiles_once(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "c", "max_steps=6"), log=_quiet)
    counts = []
    for _ in range(5):
        trainer.train_step()
        runtime.sync()
        trainer.step += 1
        counts.append(runtime.compile_count())
    # AdamW's state exists before the first step, so every step runs the same compiled graph.
    assert counts[0] == counts[1] == counts[2] == counts[3] == counts[4], counts
    # Nor does a long run recompile when AdamW's bias corrections round to exactly 1 (torch_xla makes the
    # scalars 0 and 1 graph constants): 1 - 0.95**n == 1.0 from n = 730 on (betas 0.9, 0.95).
    assert 1 - 0.95 ** 729 != 1.0 and 1 - 0.95 ** 730 == 1.0 and trainer.optimizer.defaults["betas"] == (0.9, 0.95)
    for state in trainer.optimizer.state.values():
        state["step"].fill_(727)
    for _ in range(4):
        trainer.train_step()
        runtime.sync()
        trainer.step += 1
    assert runtime.compile_count() == counts[-1]


@pytest.mark.parametrize("args", [
    ["data.dataset_name=bundled:alpaca/train.json", "data.sft.format=alpaca"],
    ["data.dataset_name=bundled:sharegpt/train.jsonl", "data.sft.format=sharegpt"],
    ["data.dataset_name=bundled:messages/train.jsonl", "data.sft.format=messages"],
    ["data=pretrain", "training_mode=pretrain"],
], ids=["alpaca", "sharegpt", "messages", "pretrain"])
def test_command_line_trains_each_format(tmp_path, capsys, args):
    from train.run import main

    assert main(SMALL + args + ["model=qwen3-tiny", "max_steps=2", f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "held-out loss:" in out
    assert (tmp_path / "checkpoints" / "step-00000002" / "model.safetensors").is_file()


def test_command_line_custom_format_from_a_user_file(tmp_path, capsys):
    from train.run import main

    rows = [{"question": f"Reverse: {w}", "answer": w[::-1]} for w in ("abc", "hello", "pallas", "xyz", "torch")]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 8) + "\n")
    args = [f"data.dataset_name={path}", "data.sft.format=custom", "data.sft.custom_format.instruction_field=question",
            "data.sft.custom_format.response_field=answer", "data.eval_examples=4"]
    assert main(SMALL + args + ["max_steps=2", f"output_dir={tmp_path / 'out'}"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out


def test_malformed_file_fails_with_one_line_naming_file_record_field(tmp_path, capsys):
    from train.run import main

    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps({"instruction": "Reverse: abc", "output": "cba"}) + "\n"
                    + json.dumps({"instruction": "Reverse: xy"}) + "\n")
    assert main([f"data.dataset_name={path}", "data.sft.format=alpaca", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert "broken.jsonl" in err and "line 2" in err and "output" in err


def test_invalid_config_value_fails_with_one_line(capsys):
    from train.run import main

    assert main(["training_mode=finetune"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: training_mode: unknown value 'finetune'; allowed: sft, pretrain"


def test_gradient_accumulation_matches_one_larger_batch(tmp_path):
    # loss_norm=batch divides every micro-batch by the same B*L, so two accumulated halves must give
    # the loss and gradient of the whole batch: same rows, same noise (drawn per step, then sliced).
    stats = {}
    for accum in (1, 2):
        trainer = Trainer(_cfg(tmp_path, f"acc{accum}", "max_steps=1", f"gradient_accumulation_steps={accum}",
                               "diffusion.loss_norm=batch"), log=_quiet)
        out, tokens = trainer.train_step()
        runtime.sync()
        stats[accum] = ({k: v.item() for k, v in out.items()}, tokens)
    (one, tokens_one), (two, tokens_two) = stats[1], stats[2]
    assert tokens_one == tokens_two
    assert two["loss_positions"] == one["loss_positions"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)


def test_full_mask_steps_mask_whole_answers_then_hand_over_to_uniform_t(tmp_path):
    # diffusion.full_mask_steps=2: steps 0 and 1 mask every maskable token, so they have more loss
    # positions than the same rows under t ~ U(eps, 1); step 2 draws exactly the plain run's noise.
    positions = {}
    for full in (0, 2):
        trainer = Trainer(_cfg(tmp_path, f"full{full}", "max_steps=3", f"diffusion.full_mask_steps={full}"),
                          log=_quiet)
        positions[full] = []
        for step in range(3):
            trainer.step = step
            out, _ = trainer.train_step()
            runtime.sync()
            positions[full].append(out["loss_positions"].item())
    plain, full = positions[0], positions[2]
    assert full[0] > plain[0] and full[1] > plain[1]
    assert full[2] == plain[2]


def test_bf16_trains_with_the_pallas_kernels_and_tracks_fp32(tmp_path):
    """precision=bf16 (TPU's default) with both Pallas kernels on the CPU: under autocast q and k leave the
    fp32-weighted RMSNorm as fp32 and v as bf16, and the LM head's operands are fp32 parameters; the kernels
    get one dtype (bf16 operands, fp32 accumulation). The run trains and its loss follows fp32's."""
    losses = {}
    for precision in ("fp32", "bf16"):
        result = Trainer(_cfg(tmp_path, precision, "max_steps=40", f"precision={precision}",
                              "model.attention_kernel=pallas", "model.loss_kernel=pallas",
                              "diffusion.full_mask_steps=0"), log=_quiet).fit()
        losses[precision] = [result.step_losses[s] for s in sorted(result.step_losses)]
        assert result.final_eval["eval/loss"] < 0.5 * result.initial_eval["eval/loss"], precision
    fp32, bf16 = losses["fp32"], losses["bf16"]
    late = lambda xs: sum(xs[-10:]) / 10  # noqa: E731
    assert late(bf16) == pytest.approx(late(fp32), rel=0.15), (late(bf16), late(fp32))
    for step in (0, 1, 2):  # the same weights and noise: the first steps differ by bf16 rounding only
        assert bf16[step] == pytest.approx(fp32[step], rel=0.02), step
