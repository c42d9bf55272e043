"""Evaluate a checkpoint: held-out masked-token loss and exact-match accuracy of generated answers.

`python -m train.evaluate <checkpoint> [--max-examples N] [--eval-max-batches N] [--show N] [sampler flags]`

- Held-out loss: the training objective on the held-out batches at a fixed grid of t with fixed noise
  (`train.trainer.heldout_loss`), so the number is deterministic and comparable across runs and with
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

from train.generate import GenerationConfig, generate


def exact_match(model, tokenizer, examples: Sequence[tuple[Sequence[int], str]], gen_cfg: GenerationConfig,
                device, *, diffusion, autocast: Callable[[], Any] = contextlib.nullcontext,
                ) -> tuple[float, list[tuple[str, str, str]]]:
    """(accuracy, [(prompt text, generated answer, reference), ...]) over `examples` = [(prompt ids,
    reference)] (as `data.load_eval_examples` returns them). `diffusion` is the model's
    DiffusionConfig (mask token, shift_logits). All batches share one padded shape, so repeated calls
    on the same examples (before, during and after training) reuse one compiled step graph."""
    if not examples:
        return 0.0, []
    prompts = [list(p) for p, _ in examples]
    answers = generate(model, tokenizer, prompts, gen_cfg, diffusion=diffusion, device=device,
                       autocast=autocast)
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


def main(argv: list[str] | None = None) -> int:
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
    add_sampler_args(parser)
    args = parser.parse_args(argv)

    from train import runtime

    runtime.xla_device()  # before any autograd (DESIGN.md section 6)
    from data import DataError, build_eval_batches, load_eval_examples
    from train.checkpoint import CheckpointError
    from train.config import ConfigError
    from train.trainer import autocast_context, heldout_loss

    try:
        if args.max_examples is not None and args.max_examples < 1:
            raise ConfigError(f"--max-examples: must be a positive integer, got {args.max_examples}")
        loaded = load_for_inference(args.checkpoint)
        cfg, tok = loaded.cfg, loaded.tokenizer
        gen_cfg = sampler_from_args(loaded.generation, args)
        autocast = lambda: autocast_context(cfg)  # noqa: E731
        print(f"checkpoint: {loaded.path} (step {loaded.step})")
        report: dict[str, Any] = {"checkpoint": str(loaded.path), "step": loaded.step}
        if not args.no_loss:
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
        if not args.no_exact_match:
            examples = load_eval_examples(cfg.data, tok, max_examples=args.max_examples,
                                          training_mode=cfg.training_mode)
            if not examples:
                print("exact match: n/a (no held-out SFT examples)")
            else:
                acc, gens = exact_match(loaded.model, tok, examples, gen_cfg, loaded.device,
                                        diffusion=loaded.diffusion, autocast=autocast)
                hits = sum(is_match(a, r) for _, a, r in gens)
                print(f"exact match: {acc:.1%} ({hits}/{len(gens)} held-out examples; sampler: {gen_cfg.describe()})")
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
