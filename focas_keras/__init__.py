"""FoCasNet mitosis detection in Keras 3 / TensorFlow.

Importing the package registers every custom layer with Keras (package name ``focas_keras``),
so ``keras.saving.load_model(path, safe_mode=True)`` loads a saved Mdet or Mclass after a plain
``import focas_keras``. The import itself stays light (no TensorFlow, so ``focas-keras --help``
answers at once): the layers register when Keras is imported, or at once when it already is,
and TensorFlow's start-up chatter is kept off stderr whoever imports it
(:mod:`focas_keras.import_hooks`). A module whose import registers Keras classes belongs in
:data:`focas_keras.import_hooks.REGISTERING`, not in an import here.
"""

__version__ = "0.1.0"

from focas_keras import import_hooks as _import_hooks  # noqa: E402

_import_hooks.install()
