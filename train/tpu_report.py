"""`python -m train.tpu_report`: the shipped recipes' train steps compiled for TPU slices on this machine.

Each case runs a recipe script (recipes/*.sh) exactly as a user would, with `compile_only=<topology>` added
(train/aot.py; nothing is trained and no data or weights are read), and CHIPS set to the slice's chip count. The
two Qwen3-1.7B recipes are compiled as they stand for v5e-8 and v6e-8; every preset is compiled at the SFT
recipe's rows (64 x 1,024 tokens, FSDP over the slice) for the smallest v5e and v5p slices it fits. Prints the
README's scaling table; --json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"sft": ROOT / "recipes" / "qwen3-1.7b-sft.sh", "pretrain": ROOT / "recipes" / "qwen3-1.7b-pretrain.sh"}
V5E = ["v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8"]
V5P = ["v5p:1x1x1", "v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4"]
PALLAS = ["model.attention_kernel=pallas", "model.loss_kernel=pallas"]  # qwen3-tiny's CPU default is reference
# (label, recipe, extra overrides, topologies: "all" compiles each, "smallest" stops at the first that fits)
CASES = [
    ("qwen3-1.7b SFT recipe", "sft", [], ("all", ["v5e:2x4", "v6e:2x4"])),
    ("qwen3-1.7b pretraining recipe", "pretrain", [], ("all", ["v5e:2x4", "v6e:2x4"])),
] + [(f"{preset} at the SFT recipe's rows", "sft", [f"model={preset}"] + extra, ("smallest", chips))
     for preset, extra in (("qwen3-tiny", PALLAS), ("qwen3-0.6b", []), ("qwen3-1.7b", []), ("qwen3-4b", []),
                           ("qwen3-8b", []))
     for chips in (V5E, V5P)]
HEADROOM = 0.10  # a slice "fits" a case when it leaves at least this much HBM free per chip


def compile_case(recipe: str, extra: list[str], topology: str, out: Path, log) -> dict:
    from train.aot import devices_needed

    chips = devices_needed(topology)
    with tempfile.TemporaryDirectory() as init:  # the SFT recipe wants INIT: an empty folder is read as nothing
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "INIT": init, "DATASET": "unused-by-compile-only", "CHIPS": str(chips), "SLICES": "1"}
        cmd = ["bash", str(RECIPES[recipe]), *extra, f"compile_only={topology}", f"compile_report={out}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1) or not out.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result.update(recipe=recipe, overrides=extra, seconds=time.perf_counter() - start)
    log(f"  {topology}: {'fits' if result['fits'] else 'does not fit'}, {result['hbm_per_chip'] / 2**30:.2f} GiB per chip "
        f"({result['headroom']:+.0%}), {result['seconds']:.0f} s")
    return result


def run(cases=CASES, log=print) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (label, recipe, extra, (mode, topologies)) in enumerate(cases):
            log(f"{label} ({mode} of {', '.join(topologies)})")
            for i, topology in enumerate(topologies):
                result = compile_case(recipe, extra, topology, Path(tmp) / f"{n}-{i}.json", log)
                result["label"] = label
                if mode == "all" or (result["fits"] and result["headroom"] >= HEADROOM):
                    rows.append(result)
                    if mode == "smallest":
                        break
            else:
                if mode == "smallest":
                    rows.append({"label": label, "topology": f"none of {', '.join(topologies)}", "fits": False})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | slice | fits | HBM per chip (of) | headroom | compiled / model FLOPs | roofline step | MFU ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "hbm_per_chip" not in r:
            lines.append(f"| {r['label']} | {r['topology']} | no | | | | | |")
            continue
        flops = f"{r['flops'] / r['model_flops']:.2f}" if r.get("flops") else ""
        step = f"{r['step_seconds_lower_bound'] * 1e3:.0f} ms" if r.get("step_seconds_lower_bound") else ""
        mfu = f"{r['mfu_ceiling']:.0%}" if r.get("mfu_ceiling") else ""
        lines.append(f"| {r['label']} | {r['topology']} ({r['chips']} chips) | {'yes' if r['fits'] else 'no'} | "
                     f"{r['hbm_per_chip'] / 2**30:.2f} GiB ({r['chip_hbm'] / 2**30:.2f}) | {r['headroom']:+.0%} | "
                     f"{flops} | {step} | {mfu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every case's figures to this file")
    args = parser.parse_args(argv)
    rows = run()
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
