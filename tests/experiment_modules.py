"""Loads a script of ``experiments/`` as a module for the tests of its pure logic."""

import importlib.util
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name: str):
    """``experiments/<name>.py`` as the module ``_exp_<name>`` (registered, so dataclasses and
    pickling work), with ``experiments/`` on the path for the scripts' imports of each
    other."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(f"_exp_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
