"""What ``import focas_keras`` arranges without importing TensorFlow (so the CLI starts fast).

Two things used to happen eagerly at ``import focas_keras``: TensorFlow was imported with its
start-up chatter kept off stderr, and every custom layer was registered with Keras. Both now
happen when they are needed, and still without the user doing anything:

- the first ``import tensorflow`` anywhere (ours or the user's) runs with stderr sent to
  /dev/null (:func:`_quiet_exec`; FOCAS_KERAS_VERBOSE=1 shows
  it), and probes the devices once, inside the quiet window;
- the first ``import keras`` anywhere ends by importing :data:`REGISTERING`, whose classes
  register themselves, so ``import focas_keras, keras; keras.saving.load_model(p,
  safe_mode=True)`` loads our models as before. Where Keras is already imported,
  :func:`install` registers at once.

Both are done by a finder at the front of ``sys.meta_path`` that wraps the loader of those two
top-level modules (every other attribute of the loader is passed through); it leaves
``sys.meta_path`` once both have been imported.
"""

from __future__ import annotations

import importlib
import os
import sys

#: Modules whose import registers classes with Keras (the package name ``focas_keras``).
REGISTERING = (
    "focas_keras.layers.cbam",
    "focas_keras.layers.group_norm",
    "focas_keras.layers.ws_conv2d",
    "focas_keras.models.fpn",
    "focas_keras.models.head",
    "focas_keras.training.schedules",
)


def register_layers() -> None:
    """Imports :data:`REGISTERING` (imports Keras and TensorFlow)."""
    for name in REGISTERING:
        importlib.import_module(name)


def _quiet_exec(loader, module) -> None:
    """Runs TensorFlow's import with stderr on /dev/null, then probes its devices there."""
    if os.environ.get("FOCAS_KERAS_VERBOSE"):
        loader.exec_module(module)
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            loader.exec_module(module)
            module.config.list_physical_devices()  # probes CUDA (and complains) once, here
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _exec_then_register(loader, module) -> None:
    loader.exec_module(module)
    register_layers()


class _Loader:
    """A module's own loader, with ``exec_module`` wrapped by ``run(loader, module)``;
    ``finished()`` is called once it has run."""

    def __init__(self, loader, run, finished):
        self._loader, self._run, self._finished = loader, run, finished

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._run(self._loader, module)
        self._finished()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Finds ``tensorflow`` and ``keras`` with the other finders and wraps their loaders."""

    def __init__(self):
        self.pending = {"tensorflow": _quiet_exec, "keras": _exec_then_register}

    def find_spec(self, name, path=None, target=None):
        run = self.pending.get(name)
        if run is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        # Done only once the module has run: importlib.util.find_spec (a probe for an
        # optional dependency) asks for a spec that is never executed.
        spec.loader = _Loader(spec.loader, run, lambda: self._finished(name))
        return spec

    def _finished(self, name):
        self.pending.pop(name, None)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Sets TensorFlow's log level default and arranges the two steps above (once)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    finder = _Finder()
    if "tensorflow" in sys.modules:
        del finder.pending["tensorflow"]
    if "keras" in sys.modules:
        del finder.pending["keras"]
        register_layers()
    if finder.pending:
        sys.meta_path.insert(0, finder)
