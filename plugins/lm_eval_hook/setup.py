"""Installs pallas_dlm_lm_eval_hook.py and the .pth line that imports it at interpreter start.

setuptools has no option for a top-level .pth file in site-packages, so build_py writes it next to the
module in the build folder (a regular, non-editable install copies both into site-packages)."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "pallas_dlm_lm_eval.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        (Path(self.build_lib) / PTH).write_text("import pallas_dlm_lm_eval_hook; pallas_dlm_lm_eval_hook.install()\n")

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildWithPth})
