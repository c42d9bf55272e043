"""Exact-match evaluation, the trainer's before/after report, and the generate/evaluate command lines on
a checkpoint trained here."""

import json

import pytest

from model.diffusion import DiffusionConfig
from test_generate import IM_END, MASK, TOK, FixedAnswerLM, ids
from train.evaluate import exact_match, format_examples, is_match, prompt_summary
from train.generate import GenerationConfig

GEN = GenerationConfig(max_new_tokens=6, block_length=3, steps=6, batch_size=2)
DIFF = DiffusionConfig(mask_token_id=MASK)


def _examples(*refs):
    # prompts of different lengths, so batches are left-padded
    return [(ids(f"question number {i}" + "?" * i), ref) for i, ref in enumerate(refs)]


def test_exact_match_scores_a_right_and_a_wrong_model():
    examples = _examples("cab", "cab", " cab\n", "cab")  # surrounding whitespace does not count
    right = FixedAnswerLM(ids("cab") + [IM_END], 6)
    acc, rows = exact_match(right, TOK, examples, GEN, "cpu", diffusion=DIFF)
    assert acc == 1.0 and [a for _, a, _ in rows] == ["cab"] * 4
    assert rows[0][0] == TOK.decode(examples[0][0]) and rows[2][2] == " cab\n"
    wrong = FixedAnswerLM(ids("cabx") + [IM_END], 6)  # a prefix is not a match
    assert exact_match(wrong, TOK, examples, GEN, "cpu", diffusion=DIFF)[0] == 0.0
    acc, _ = exact_match(right, TOK, _examples("cab", "abc", "cab"), GEN, "cpu", diffusion=DIFF)
    assert acc == pytest.approx(2 / 3)
    assert exact_match(right, TOK, [], GEN, "cpu", diffusion=DIFF) == (0.0, [])


def test_formatting_helpers():
    assert is_match(" x ", "x") and not is_match("x", "X")
    prompt = "<|im_start|>user\nSort it.\n\nqbv<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert prompt_summary(prompt) == "Sort it. / qbv"
    lines = format_examples([(prompt, "bqv", "bqv"), (prompt, "bvq", "bqv")], 5)
    assert lines[0].split()[0] == "ok" and lines[1].split()[0] == "MISS" and "'bvq'" in lines[1]
    assert len(format_examples([(prompt, "a", "a")] * 9, 3)) == 3


# ---- on a checkpoint trained here (slow: a real Trainer run) --------------------------------------

SMALL = ["global_batch_size=4", "data.block_size=64", "eval_max_batches=1", "logging_steps=1",
         "lr_scheduler.warmup_steps=2", "max_steps=2", "generation.eval_exact_match_examples=6",
         "generation.max_new_tokens=8", "generation.batch_size=4", "generation.eval_show_examples=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from train import runtime
    from train.config import load_config
    from train.trainer import Trainer

    out = tmp_path_factory.mktemp("run")
    lines = []
    trainer = Trainer(load_config(SMALL + [f"output_dir={out}"]), log=lines.append)
    result = trainer.fit()
    before = runtime.compile_count()
    trainer.evaluate()  # same examples, same padded shape: no new sampler graph
    return out, result, lines, runtime.compile_count() - before


@pytest.mark.slow
def test_trainer_reports_exact_match_before_and_after(trained):
    out, result, lines, new_compiles = trained
    for ev in (result.initial_eval, result.final_eval):
        assert 0.0 <= ev["eval/exact_match"] <= 1.0
    text = "\n".join(lines)
    assert "held-out exact match before training:" in text
    report = [line for line in lines if line.startswith("held-out exact match: ")]
    assert len(report) == 1 and "->" in report[0] and "6 examples" in report[0]
    assert sum(1 for line in lines if "(reference " in line) == 2
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/exact_match" in r] == [0, 2]
    assert new_compiles == 0


@pytest.mark.slow
def test_generate_command_line(trained, capsys, tmp_path):
    from train.generate import main

    out, result, _, _ = trained
    assert main([str(out), "--prompt", "Reverse: abc", "--prompt", "Upper: hello there",
                 "--steps", "4", "--temperature", "0.5", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"(step {result.steps_done})" in printed and "4 steps" in printed and "seed 3" in printed
    assert ">>> Reverse: abc" in printed and ">>> Upper: hello there" in printed
    # a prompts file: text lines and JSONL records, same checkpoint through its step folder
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Sort: cab"}) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "Add: 1 2"},
                                                {"role": "assistant", "content": "3"}]}) + "\n")
    assert main([str(result.checkpoint), "--prompts-file", str(jsonl)]) == 0
    printed = capsys.readouterr().out
    assert ">>> Sort: cab" in printed and '"Add: 1 2"' in printed and '"assistant"' not in printed
    assert "2 answers, " in printed and "tokens/s" in printed
    # the faster decoding flags reach the sampler
    assert main([str(out), "--prompt", "Reverse: abc", "--threshold", "0.9", "--cache", "dual",
                 "--block-length", "4", "--no-stop-at-eos"]) == 0
    printed = capsys.readouterr().out
    assert "threshold 0.9" in printed and "cache dual" in printed and "no early stop" in printed
    assert main([str(out), "--prompt", "x", "--threshold", "2"]) == 2
    assert "generation.threshold:" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": 3}\n')
    assert main([str(out), "--prompts-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl line 2" in err and "\n" not in err.strip()


@pytest.mark.slow
def test_evaluate_command_line_matches_the_trainer(trained, capsys, tmp_path):
    from train.evaluate import main

    out, result, _, _ = trained
    report = tmp_path / "r.json"
    assert main([str(out), "--max-examples", "6", "--show", "3", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss:" in printed and "exact match:" in printed
    saved = json.loads(report.read_text())
    # deterministic held-out loss and the same sampler settings as the run: the trainer's figures
    assert saved["eval/loss"] == pytest.approx(result.final_eval["eval/loss"], rel=1e-5)
    assert saved["eval/exact_match"] == result.final_eval["eval/exact_match"]
    assert len(saved["generations"]) == 6
    assert saved["decoding"]["prompts"] == 6 and "decoding: 6 answers" in printed
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_code_pass_at_k_command_line(trained, capsys, tmp_path):
    # n samples per problem from the sampler, each run in the sandbox; the report names every outcome
    from train.evaluate import main

    out, _, _, _ = trained
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in [
        {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
         "test": "def check(f):\n    assert f(2, 3) == 5\n"},
        {"task_id": "t/1", "prompt": "def ident(x):\n", "entry_point": "ident",
         "test": "def check(f):\n    assert f(7) == 7\n"}]))
    report = tmp_path / "code.json"
    assert main([str(out), "--code", str(problems), "--samples", "2", "--k", "1,2,5", "--temperature", "1",
                 "--max-new-tokens", "8", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "pass@2" in printed and "skipped pass@5" in printed
    code = json.loads(report.read_text())["code"]
    assert code["n_samples"] == 4 and sum(code["statuses"].values()) == 4
    assert [len(p["completions"]) for p in code["problems"]] == [2, 2]
    assert main([str(out), "--code", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
