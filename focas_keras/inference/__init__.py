"""Inference on whole images: the two-stage cascade and what ``focas-keras detect`` writes.

``cascade`` (needs TensorFlow): :class:`~focas_keras.inference.cascade.CascadeSettings`,
:class:`~focas_keras.inference.cascade.Cascade` (``from_runs``, ``stage1``, ``stage2``,
``run``) and ``list_inputs``. ``outputs`` (NumPy/pandas/OpenCV only): detections CSV, QuPath
GeoJSON, counts per mm^2, overlays, and ``detect_to_dir``, the whole ``detect`` command.

``loading`` (light until called): :func:`~focas_keras.inference.loading.load_cascade`, the
cascade from two training runs or the bundled model, as the commands build it, and
:func:`~focas_keras.inference.loading.load_stage1` (Mdet alone, what ``mine`` runs);
re-exported here. Nothing else is imported here, so that ``outputs`` can be used without loading
TensorFlow.
"""

from focas_keras.inference.loading import load_cascade, load_stage1  # noqa: F401
