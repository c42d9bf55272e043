"""Evaluate a checkpoint: held-out masked-token loss and exact-match accuracy of generated answers.

`python -m train.evaluate <checkpoint> [--max-examples N] [--eval-max-batches N] [--show N] [sampler flags]`
`python -m train.evaluate --lm-eval --model_args pretrained=<checkpoint> --tasks ... [lm_eval arguments]`

- Held-out loss: the training objective on the held-out batches at a fixed grid of t with fixed noise
  (`heldout_loss`), so the number is deterministic and comparable across runs and with
  the trainer's own `eval/loss` for the same data and batch size.
- Exact match: each held-out SFT example's prompt (the conversation up to the last assistant turn, in
  the run's chat template) is decoded with the diffusion sampler; an answer counts when, cut at the
  first <|im_end|>/EOS and stripped of surrounding whitespace, it equals the reference answer.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch is imported: may re-execute this command (train/hostmem.py)
    from train.hostmem import use_hugepage_malloc

    use_hugepage_malloc()

import argparse
import contextlib
import json
import sys
from typing import Any, Callable, Sequence

import torch

from train.generate import GenerationConfig, generate

EVAL_T_GRID = 8          # held-out loss: midpoint quadrature over t in (eps, 1) with this many points
EVAL_NOISE_SEED = 20251  # fixed, so held-out losses are comparable across runs and checkpoints


@torch.no_grad()
def heldout_loss(model, eval_batches, diff_cfg, device, *, autocast=contextlib.nullcontext) -> dict[str, float]:
    """The training objective on held-out batches at a fixed grid of t, with fixed noise.

    eval/loss is the mean over batches and t of the loss as trained (1/t weights, `loss_norm`), a
    deterministic quadrature of the expected training loss; eval/masked_ce is the plain cross-entropy per
    masked token over the same draws.
    """
    from model.diffusion import diffusion_loss
    from train import runtime
    from train.build import batch_to_device, noise_generator

    if not eval_batches:
        return {}
    eps = diff_cfg.sampling_eps
    grid = [eps + (1.0 - eps) * (j + 0.5) / EVAL_T_GRID for j in range(EVAL_T_GRID)]
    losses, ce_sums, counts = [], [], []
    for b, batch in enumerate(eval_batches):
        dev_batch = batch_to_device(batch, device)
        rows, length = batch["input_ids"].shape
        for j, t_value in enumerate(grid):
            gen = noise_generator(EVAL_NOISE_SEED, b, j)
            u = torch.rand(rows, length, generator=gen)
            t = torch.full((rows,), t_value)
            with autocast():
                loss, stats = diffusion_loss(model, dev_batch, t.to(device), u.to(device), diff_cfg)
            losses.append(loss)
            ce_sums.append(stats["loss_sum"] * t_value)  # t is constant here: undo the 1/t weight
            counts.append(stats["num_loss_positions"])
        runtime.sync()
    loss = torch.stack(losses).float().mean().item()
    count = torch.stack(counts).float().sum().item()
    ce = torch.stack(ce_sums).float().sum().item() / max(count, 1.0)
    return {"eval/loss": loss, "eval/masked_ce": ce, "eval/loss_positions": count}


def exact_match(model, tokenizer, examples: Sequence[tuple[Sequence[int], str]], gen_cfg: GenerationConfig,
                device, *, diffusion, autocast: Callable[[], Any] = contextlib.nullcontext,
                progress: bool = False, stats: dict | None = None) -> tuple[float, list[tuple[str, str, str]]]:
    """(accuracy, [(prompt text, generated answer, reference), ...]) over `examples` = [(prompt ids,
    reference)] (as `data.load_eval_examples` returns them). `diffusion` is the model's
    DiffusionConfig (mask token, shift_logits). All batches share one padded shape, so repeated calls
    on the same examples (before, during and after training) reuse one compiled step graph.
    progress / stats: as train.generate.generate."""
    if not examples:
        return 0.0, []
    prompts = [list(p) for p, _ in examples]
    answers = generate(model, tokenizer, prompts, gen_cfg, diffusion=diffusion, device=device,
                       autocast=autocast, progress=progress, stats=stats)
    rows = [(tokenizer.decode(p), a, r) for (p, r), a in zip(examples, answers)]
    correct = sum(is_match(a, r) for _, a, r in rows)
    return correct / len(rows), rows


def is_match(answer: str, reference: str) -> bool:
    return answer.strip() == reference.strip()


def prompt_summary(prompt: str, width: int = 60) -> str:
    """The last user turn of a rendered chat prompt (or its tail), on one line, for printing."""
    head, end = "<|im_start|>user\n", "<|im_end|>"
    start = prompt.rfind(head)
    if start >= 0:
        text = prompt[start + len(head):]
        text = text[: text.find(end)] if end in text else text
    else:
        text = prompt
    text = " / ".join(part for part in text.strip().split("\n") if part)
    return text if len(text) <= width else "..." + text[-(width - 3):]


def format_examples(rows: Sequence[tuple[str, str, str]], n: int) -> list[str]:
    """Up to n lines 'ok|MISS  prompt -> answer (reference ...)'."""
    out = []
    for prompt, answer, reference in list(rows)[:n]:
        mark = "ok  " if is_match(answer, reference) else "MISS"
        out.append(f"  {mark} {prompt_summary(prompt)!r} -> {answer!r} (reference {reference!r})")
    return out


def code_pass_at_k(loaded, gen_cfg, args, autocast) -> dict[str, Any]:
    """`--code`: n completions per problem from the diffusion sampler (the prompt continued as plain
    text; sample i uses seed + i, so samples differ when temperature > 0), run in train.sandbox, pass@k."""
    from dataclasses import replace

    from train import code_eval
    from train.generate import generate, speed_line

    if args.samples < 1:
        raise ValueError(f"--samples: must be a positive integer, got {args.samples}")
    try:
        ks = [int(k) for k in str(args.k).split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--k: expected comma-separated integers, got {args.k!r}") from None
    problems = code_eval.load_problems(args.code)[: args.limit]
    if not problems:
        raise ValueError(f"--code {args.code}: no problems")
    if args.samples > 1 and gen_cfg.temperature == 0:
        print("note: temperature 0 decodes greedily: every sample of a problem is the same (use --temperature)")
    tok = loaded.tokenizer
    ids = [tok.encode(p.prompt) for p in problems]
    speed = dict.fromkeys(("prompts", "answer_tokens", "seconds", "full_steps", "window_steps"), 0)
    draws = iter(range(args.samples))

    def sample(prompts: list[str]) -> list[str]:
        cfg, stats = replace(gen_cfg, seed=gen_cfg.seed + next(draws)), {}
        texts = generate(loaded.model, tok, ids, cfg, diffusion=loaded.diffusion, device=loaded.device,
                         autocast=autocast, progress=True, stats=stats)
        for key in speed:
            speed[key] += stats.get(key, 0)
        return texts

    completions = code_eval.generate_completions(problems, args.samples, sample)
    speed["tokens_per_s"] = speed["answer_tokens"] / speed["seconds"] if speed["seconds"] else 0.0
    results = code_eval.evaluate_completions(problems, completions, ks, timeout_s=args.code_timeout)
    print(f"code: {args.code}, sampler: {gen_cfg.describe(loaded.diffusion)}; decoding: {speed_line(speed)}")
    print(code_eval.format_table(results))
    for row, problem in zip(results["problems"], problems):
        row["completions"] = completions[problem.task_id]
    return {"code": results}


def run_lm_eval(argv: list[str]) -> int:
    """`python -m train.evaluate --lm-eval <lm_eval arguments>`: lm-evaluation-harness's own command line
    with our model registered (train/lm_eval_model.py); `--model pallas-dlm` is the default."""
    try:
        import lm_eval.__main__ as harness
    except ImportError:
        print("error: --lm-eval needs lm-evaluation-harness: pip install 'lm-eval==0.4.13'", file=sys.stderr)
        return 2
    import train.lm_eval_model  # noqa: F401  (registers pallas-dlm)

    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ["--model", "pallas-dlm", *argv]
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        harness.cli_evaluate()
    except SystemExit as done:
        return int(done.code or 0) if not isinstance(done.code, str) else 2
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--lm-eval":
        return run_lm_eval(argv[1:])
    from train.generate import add_sampler_args, load_for_inference, sampler_from_args

    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="step folder, checkpoints folder or run output_dir")
    parser.add_argument("--max-examples", type=int, help="exact match on the first N held-out examples (default: all)")
    parser.add_argument("--eval-max-batches", type=int,
                        help="held-out loss on the first N batches (default: the run's eval_max_batches)")
    parser.add_argument("--show", type=int, default=5, help="print this many generated examples (default 5)")
    parser.add_argument("--no-loss", action="store_true", help="skip the held-out loss")
    parser.add_argument("--no-exact-match", action="store_true", help="skip generation")
    parser.add_argument("--json", metavar="PATH", help="also write the results (and every generation) here")
    code = parser.add_argument_group("code pass@k (instead of the held-out loss and exact match)")
    code.add_argument("--code", metavar="SOURCE", help="humaneval, mbpp (a local file named by PALLAS_DLM_MBPP) or "
                      "a .jsonl of problems in HumanEval's fields")
    code.add_argument("--samples", type=int, default=1, help="completions per problem, n (default 1)")
    code.add_argument("--k", default="1,10,100", help="pass@k for these k <= n (default 1,10,100)")
    code.add_argument("--limit", type=int, help="the first N problems only")
    code.add_argument("--code-timeout", type=float, default=10.0, help="wall seconds per program (default 10)")
    add_sampler_args(parser)
    args = parser.parse_args(argv)

    from train import runtime

    runtime.xla_device()  # before any autograd (DESIGN.md section 6)
    from data import DataError, build_eval_batches, load_eval_examples
    from train.checkpoint import CheckpointError
    from train.config import ConfigError
    from train.build import autocast_context

    try:
        if args.max_examples is not None and args.max_examples < 1:
            raise ConfigError(f"--max-examples: must be a positive integer, got {args.max_examples}")
        loaded = load_for_inference(args.checkpoint)
        cfg, tok = loaded.cfg, loaded.tokenizer
        gen_cfg = sampler_from_args(loaded.generation, args)
        autocast = lambda: autocast_context(cfg)  # noqa: E731
        print(f"checkpoint: {loaded.path} (step {loaded.step})")
        report: dict[str, Any] = {"checkpoint": str(loaded.path), "step": loaded.step}
        if args.code:
            report.update(code_pass_at_k(loaded, gen_cfg, args, autocast))
        elif not args.no_loss:
            rows = int(cfg.global_batch_size) // int(cfg.gradient_accumulation_steps)  # as the trainer batches
            batches = build_eval_batches(cfg.data, tok, training_mode=cfg.training_mode, batch_size=rows)
            cap = args.eval_max_batches if args.eval_max_batches is not None else cfg.get("eval_max_batches")
            if cap is not None:
                batches = batches[: int(cap)]
            loss = heldout_loss(loaded.model, batches, loaded.diffusion, loaded.device, autocast=autocast)
            report.update(loss)
            if loss:
                print(f"held-out loss: {loss['eval/loss']:.4f} (masked-token CE {loss['eval/masked_ce']:.4f}, "
                      f"{int(loss['eval/loss_positions'])} loss positions, {len(batches)} batches x {rows} rows, "
                      f"fixed t grid)")
            else:
                print("held-out loss: n/a (no held-out split)")
        if not args.no_exact_match and not args.code:
            examples = load_eval_examples(cfg.data, tok, max_examples=args.max_examples,
                                          training_mode=cfg.training_mode)
            if not examples:
                print("exact match: n/a (no held-out SFT examples)")
            else:
                from train.generate import speed_line

                speed: dict = {}
                acc, gens = exact_match(loaded.model, tok, examples, gen_cfg, loaded.device,
                                        diffusion=loaded.diffusion, autocast=autocast, progress=True, stats=speed)
                hits = sum(is_match(a, r) for _, a, r in gens)
                print(f"exact match: {acc:.1%} ({hits}/{len(gens)} held-out examples; sampler: {gen_cfg.describe(loaded.diffusion)})")
                print(f"decoding: {speed_line(speed)}")
                report["decoding"] = speed
                for line in format_examples(gens, args.show):
                    print(line)
                report["eval/exact_match"] = acc
                report["generations"] = [{"prompt": p, "answer": a, "reference": r} for p, a, r in gens]
    except (ConfigError, CheckpointError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
