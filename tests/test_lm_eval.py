"""lm-evaluation-harness integration (train/lm_eval_model.py): a multiple-choice task of our own through
lm-eval's own command line (`--include_path`), the Monte-Carlo ELBO's variance, rolling likelihoods and
generation with stop sequences, on a qwen3-tiny model trained here for a few hundred steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
TRAIN = ["max_steps=300", "diffusion.full_mask_steps=200", "lr_scheduler.warmup_steps=10",
         "generation.eval_exact_match_examples=0", "eval_max_batches=1", "logging_steps=100"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from train import runtime
    from train.config import load_config
    from train.trainer import Trainer

    runtime.xla_device()
    out = tmp_path_factory.mktemp("lm-eval-run")
    Trainer(load_config(TRAIN + [f"output_dir={out}"]), log=lambda *a, **k: None).fit()
    return out


@pytest.fixture(scope="module")
def model(checkpoint):
    from train.lm_eval_model import PallasDLM

    return PallasDLM(pretrained=str(checkpoint), mc_samples=8, batch_size=32, progress=False)


def _choices(reference: str, others: list[str], rng) -> list[str]:
    """The reference and three wrong answers of the same length (permutations, other references)."""
    wrong = []
    for candidate in [reference[::-1], reference[1:] + reference[:1], *others]:
        if candidate != reference and candidate not in wrong and candidate:
            wrong.append(candidate)
    choices = [reference, *wrong[:3]]
    rng.shuffle(choices)
    return choices


def _task(tmp_path: Path, checkpoint: Path, n: int) -> Path:
    """A multiple-choice task over the run's held-out examples, written as lm-eval files."""
    from data import load_eval_examples
    from train.generate import load_for_inference

    loaded = load_for_inference(checkpoint)
    examples = load_eval_examples(loaded.cfg.data, loaded.tokenizer, max_examples=n)
    refs = [r for _, r in examples]
    rng = np.random.default_rng(0)
    docs = []
    for i, (prompt, ref) in enumerate(examples):
        choices = _choices(ref, [x for x in refs if x != ref and len(x) == len(ref)][:3], rng)
        docs.append({"prompt": loaded.tokenizer.decode(prompt), "choices": choices, "answer": choices.index(ref)})
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "pallas_demo_mc.yaml").write_text(
        "task: pallas_demo_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{prompt}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    return tasks


def _results(out: Path) -> dict:
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results under {out}"
    return json.loads(files[-1].read_text())["results"]["pallas_demo_mc"]


def test_multiple_choice_through_lm_evals_own_command_line(checkpoint, tmp_path):
    # `lm_eval` itself finds pallas-dlm (the .pth hook of plugins/lm_eval_hook), and the trained model
    # ranks the right answer first far above chance (1 in 4)
    tasks = _task(tmp_path, checkpoint, 24)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([str(VENV_BIN / "lm_eval"), "--model", "pallas-dlm", "--model_args",
                          f"pretrained={checkpoint},mc_samples=4", "--batch_size", "64", "--tasks", "pallas_demo_mc",
                          "--include_path", str(tasks), "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    acc = _results(tmp_path / "out")["acc,none"]
    assert acc >= 0.6, acc
    # the same through our own entry point
    run = subprocess.run([sys.executable, "-m", "train.evaluate", "--lm-eval", "--model_args",
                          f"pretrained={checkpoint},mc_samples=2", "--batch_size", "64", "--tasks", "pallas_demo_mc",
                          "--include_path", str(tasks), "--limit", "4", "--output_path", str(tmp_path / "own")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 0.0 <= _results(tmp_path / "own")["acc,none"] <= 1.0


def test_elbo_variance_falls_with_more_samples(model, checkpoint):
    from data import load_eval_examples
    from train.generate import load_for_inference

    loaded = load_for_inference(checkpoint)
    prompt, ref = load_eval_examples(loaded.cfg.data, loaded.tokenizer, max_examples=1)[0]
    pair = [(list(prompt), model.tokenizer.encode(ref + "xyz"))]  # a longer continuation: more to sample
    spread = {s: np.var([model.score_pairs(pair, samples=s, seed=k)[0][0] for k in range(10)]) for s in (2, 32)}
    assert spread[32] < spread[2] / 4, spread
    # a bound on a log-probability: never positive
    assert all(v <= 1e-6 for v, _ in model.score_pairs(pair * 3, samples=4))


class _Request:
    def __init__(self, *args):
        self.args = args


def test_rolling_likelihood_and_generation_with_stop_sequences(model):
    text = "Reverse it.\n\nabcde=edcba"
    rolling = model.loglikelihood_rolling([_Request(text)])[0]
    enc = model.tokenizer.encode(text)
    whole = model.score_pairs([([model.eot_token_id], enc)])[0][0]
    assert rolling < 0 and rolling == pytest.approx(whole, rel=0.5)  # one window here: the same bound
    model.max_length = 8  # several windows: every token scored once
    try:
        assert model.loglikelihood_rolling([_Request(text)])[0] < 0
    finally:
        model.max_length = model.model.config.max_position_embeddings
    out = model.generate_until([_Request("Upper it.\n\nabc=", {"until": ["B"], "max_gen_toks": 8}),
                                _Request("Upper it.\n\nabc=", {"until": [], "max_gen_toks": 8})])
    assert "B" not in out[0] and out[1].startswith(out[0])


def test_sampler_options_arrive_as_model_args(checkpoint):
    from train.config import ConfigError
    from train.lm_eval_model import PallasDLM

    model = PallasDLM(pretrained=str(checkpoint), threshold="0.5", cache="dual", stop_at_eos="false",
                      block_length="4", progress=False)
    g = model.generation
    assert (g.threshold, g.cache, g.stop_at_eos, g.block_length) == (0.5, "dual", False, 4)
    with pytest.raises(ConfigError, match="generation.temprature: unknown key"):
        PallasDLM(pretrained=str(checkpoint), temprature="0.5", progress=False)
