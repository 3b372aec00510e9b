"""FoCasNet mitosis detection in Keras 3 / TensorFlow.

Importing the package registers every custom layer with Keras (package name ``focas_keras``),
so ``keras.saving.load_model(path, safe_mode=True)`` loads a saved Mdet or Mclass after a plain
``import focas_keras``.
"""

__version__ = "0.1.0"

from focas_keras.tf_import import import_tensorflow as _import_tensorflow  # noqa: E402

_import_tensorflow()

# Registration happens when the classes are defined: import every module that defines one.
from focas_keras.layers import cbam, group_norm, ws_conv2d  # noqa: E402,F401
from focas_keras.models import fpn, head  # noqa: E402,F401
from focas_keras.training import schedules  # noqa: E402,F401
