"""Old import paths of the dataset tools, kept as aliases.

The readers, annotations and image I/O, ``prepare``, synthetic data and slides, and shard
writing now live in :mod:`focas_keras.datasets`, and hard-negative mining in
:mod:`focas_keras.training.mine`: ``focas_keras`` never imports ``data_tools`` (imports go one
way), and these modules only re-export the new ones.
"""
