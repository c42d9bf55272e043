"""Makes `lm_eval --model pallas-dlm` work without an import of ours in lm-eval's command line.

lm-evaluation-harness 0.4 finds models only in its registry and has no plugin discovery. This module is
imported at interpreter start by `pallas_dlm_lm_eval.pth` (site-packages runs `import` lines of .pth
files), and does almost nothing then: it waits, in sys.meta_path, for `lm_eval.evaluator` to be
imported. Once that module has run, it loads lm-eval's built-in models (lm-eval itself loads them only
into an empty registry) and registers `pallas-dlm` as a lazy "module:Class" entry, so torch, torch_xla
and our model code are imported only if that model is asked for.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TRIGGER = "lm_eval.evaluator"
TARGET = "train.lm_eval_model:PallasDLM"


def register() -> None:
    import lm_eval.models  # noqa: F401  (the built-in models first)
    from lm_eval.api.registry import model_registry

    if "pallas-dlm" not in model_registry:
        model_registry.register("pallas-dlm", target=TARGET)


class _WhenEvaluatorLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != TRIGGER:
            return None
        sys.meta_path.remove(self)  # once, and the real finders answer the lookup below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                register()
            except Exception as err:  # never break lm-eval itself
                print(f"pallas-dlm: could not register with lm-eval ({err})", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if TRIGGER not in sys.modules and not any(isinstance(f, _WhenEvaluatorLoads) for f in sys.meta_path):
        sys.meta_path.insert(0, _WhenEvaluatorLoads())
