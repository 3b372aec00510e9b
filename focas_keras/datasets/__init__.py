"""Datasets: annotation model and image I/O, readers, synthetic H&E data and slides, and
TFRecord shard writing (``focas-keras prepare``)."""
