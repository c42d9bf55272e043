"""The module graph: inference code (sampling, evaluation, export) never imports the training loop, so
trainer -> evaluate -> generate -> build is one direction and there is no import circle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = ["train/build.py", "train/generate.py", "train/evaluate.py", "train/export.py", "train/lm_eval_model.py",
             "train/code_eval.py", "train/sandbox.py", "model/kv_cache.py"]


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` names anywhere in the file (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_code_does_not_import_the_trainer(module):
    found = {m for m in imported_modules(ROOT / module) if m == "train.trainer" or m.startswith("train.trainer.")}
    assert not found, f"{module} imports {sorted(found)}"


def test_the_scan_sees_imports_inside_functions():
    # the scan must catch a late import, or the test above could not fail
    assert "train.trainer" in imported_modules(ROOT / "train/run.py")
