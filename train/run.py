"""`python -m train.run key=value ...`: train a masked-diffusion Qwen3 (SFT by default, or pretraining).

With no arguments it fine-tunes `qwen3-tiny` from random initialisation on the bundled instruction data
and prints the held-out loss before and after training.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch is imported: may re-execute this command (train/hostmem.py)
    from train.hostmem import use_hugepage_malloc

    use_hugepage_malloc()

import sys

from train import runtime


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nEvery key of train/configs/config.yaml (and model/, data/) can be set as key=value; "
              "see README.md for the reference.")
        return 0
    compile_only = _compile_only(argv)
    if compile_only == "invalid":
        return 2
    if compile_only:
        runtime.prepare_compile_only(compile_only)
    runtime.xla_device()  # before anything else touches autograd (DESIGN.md section 6)
    from data import DataError
    from train.checkpoint import CheckpointError
    from train.config import ConfigError, load_config
    from train.trainer import Trainer, TrainingDiverged

    try:
        cfg = load_config(argv)
        if cfg.compile_only:
            from train.aot import compile_step, format_report

            result = compile_step(cfg, cfg.compile_only)
            print(format_report(result))
            if cfg.compile_report:
                result.write_json(cfg.compile_report)
            return 0 if result.fits else 1
        trainer = Trainer(cfg)
        result = trainer.fit()
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    before, after = result.initial_eval.get("eval/loss"), result.final_eval.get("eval/loss")
    print(f"trained {result.steps_done} steps in {result.train_seconds:.1f} s "
          f"({result.steps_done / max(result.train_seconds, 1e-9):.2f} steps/s); total {result.total_seconds:.1f} s")
    if before is not None and after is not None:
        print(f"held-out loss: {before:.4f} -> {after:.4f} ({after / before:.1%} of the initial)")
    print(f"checkpoint: {result.checkpoint}")
    if result.stopped_by:
        print(f"stopped early by {result.stopped_by}; continue with resume_from_checkpoint=latest")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}, loss curve: {result.output_dir / 'loss_curve.png'}")
    return 0


def _compile_only(argv: list[str]):
    """compile_only=<topology> on the command line: the chips to trace for (the virtual devices must exist
    before torch_xla starts); None when absent; "invalid" (reported) for a topology that does not parse."""
    value = next((a.split("=", 1)[1] for a in argv if a.startswith("compile_only=")), None)
    if value is None or value.strip().lower() in ("", "null", "none"):
        return None
    from train.aot import devices_needed

    try:
        return devices_needed(value)
    except ValueError as err:
        print(f"error: compile_only: {err}", file=sys.stderr)
        return "invalid"


if __name__ == "__main__":
    sys.exit(main())
