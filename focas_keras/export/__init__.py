"""TF Serving: the cascade as SavedModels (``focas-keras export``) and a client for a running
server (``focas-keras predict``).

``graph`` builds the in-graph cascade (a ``tf.Module`` with serving signatures),
``savedmodel`` writes, verifies and describes the versioned export, ``client`` talks to
TensorFlow Serving over gRPC or REST and writes what ``detect`` writes.
"""
