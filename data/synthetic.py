"""Deterministic generator of the bundled sample data (data/bundled/).

Four tiny instruction tasks that a small character/byte-level model learns on a CPU in minutes:
reverse a short lowercase string, sort its letters, write it in capitals, add two 2-digit numbers. Answers
are 2-6 characters; reversal, sorting and addition answers are not substrings of their prompts, so a model
must compute them, not copy. Every rendered single-turn example is at most ~56 byte tokens under the
qwen3 template, multi-turn ones at most ~112, so several pack into a 128-token row.

Files (train / held-out, prompts never shared between the two):
  alpaca/{train,heldout}.json       JSON list, 4000 / 200 (a third put the operand in `input`)
  sharegpt/{train,heldout}.jsonl    600 / 100 conversations of 1-2 turns, some with a system prompt
  messages/{train,heldout}.jsonl    600 / 100, OpenAI role/content, 1-2 turns
  pretrain/{train,heldout}.jsonl    400 / 40 short documents stating task facts (`text` field)

Regenerate with `python -m data.synthetic` (tests check the shipped files equal a fresh generation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SEED = 20240611
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYSTEM_PROMPT = "Answer briefly."
TASKS = ("reverse", "sort", "upper", "add")


class SplitMix64:
    """A tiny PRNG with a fixed algorithm, so the bundled files never depend on Python's `random`."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n  # bias is ~n/2^64: irrelevant here

    def between(self, lo: int, hi: int) -> int:
        return lo + self.below(hi - lo + 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, p: float) -> bool:
        return self.next() < p * 2.0 ** 64


def _word(rng: SplitMix64) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.between(3, 6)))


def make_task(rng: SplitMix64, task: str) -> tuple[str, str, str, str]:
    """(short prompt, instruction, input, answer) of one task instance."""
    if task == "add":
        a, b = rng.between(10, 99), rng.between(10, 99)
        return f"Add: {a}+{b}", "Add them.", f"{a}+{b}", str(a + b)
    while True:
        w = _word(rng)
        if task == "reverse" and w[::-1] != w:
            return f"Reverse: {w}", "Reverse it.", w, w[::-1]
        if task == "sort" and "".join(sorted(w)) != w:
            return f"Sort: {w}", "Sort it.", w, "".join(sorted(w))
        if task == "upper":
            return f"Upper: {w}", "Capitalise it.", w, w.upper()


class _Unique:
    """Draws task instances whose prompt was never drawn before (keeps train and held-out disjoint)."""

    def __init__(self, rng: SplitMix64):
        self.rng = rng
        self.seen: set[str] = set()

    def draw(self) -> tuple[str, str, str, str]:
        while True:
            t = make_task(self.rng, self.rng.choice(TASKS))
            if t[0] not in self.seen:
                self.seen.add(t[0])
                return t


def _alpaca(u: _Unique, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        prompt, instruction, inp, answer = u.draw()
        if u.rng.chance(1 / 3):
            out.append({"instruction": instruction, "input": inp, "output": answer})
        else:
            out.append({"instruction": prompt, "input": "", "output": answer})
    return out


def _turns(u: _Unique) -> list[tuple[str, str]]:
    n = 2 if u.rng.chance(0.6) else 1
    return [(p, a) for p, _, _, a in (u.draw() for _ in range(n))]


def _sharegpt(u: _Unique, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        conv = [{"from": "system", "value": SYSTEM_PROMPT}] if u.rng.chance(0.25) else []
        for p, a in _turns(u):
            conv += [{"from": "human", "value": p}, {"from": "gpt", "value": a}]
        out.append({"conversations": conv})
    return out


def _messages(u: _Unique, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}] if u.rng.chance(0.25) else []
        for p, a in _turns(u):
            msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        out.append({"messages": msgs})
    return out


def _fact(rng: SplitMix64) -> str:
    task = rng.choice(TASKS)
    if task == "add":
        a, b = rng.between(10, 99), rng.between(10, 99)
        return f"{a} plus {b} is {a + b}."
    w = _word(rng)
    if task == "reverse":
        return f"The word {w} reversed is {w[::-1]}."
    if task == "sort":
        return f"Sorted, the letters of {w} read {''.join(sorted(w))}."
    return f"In capitals, {w} is {w.upper()}."


def _documents(rng: SplitMix64, n: int) -> list[dict]:
    return [{"text": " ".join(_fact(rng) for _ in range(rng.between(3, 8)))} for _ in range(n)]


def _dump_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _dump_json_list(records: list[dict]) -> str:
    # one record per line: diffable, and still a plain JSON list like Alpaca's own alpaca_data.json
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def generate() -> dict[str, str]:
    """Relative path -> file contents, fully determined by SEED."""
    files: dict[str, str] = {}
    for k, (name, make, dump, n_train, n_heldout) in enumerate((
            ("alpaca", _alpaca, _dump_json_list, 4000, 200),
            ("sharegpt", _sharegpt, _dump_jsonl, 600, 100),
            ("messages", _messages, _dump_jsonl, 600, 100))):
        u = _Unique(SplitMix64(SEED + k))
        ext = ".json" if dump is _dump_json_list else ".jsonl"
        files[f"{name}/train{ext}"] = dump(make(u, n_train))
        files[f"{name}/heldout{ext}"] = dump(make(u, n_heldout))
    rng = SplitMix64(SEED + 100)
    files["pretrain/train.jsonl"] = _dump_jsonl(_documents(rng, 400))
    files["pretrain/heldout.jsonl"] = _dump_jsonl(_documents(rng, 40))
    return files


def write(out_dir: Path) -> list[Path]:
    paths = []
    for rel, text in generate().items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "bundled")
    args = ap.parse_args(argv)
    for p in write(args.out):
        print(f"{p} ({p.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
