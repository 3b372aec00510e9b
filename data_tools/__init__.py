"""Dataset readers, synthetic H&E data and TFRecord shard writing for focas_keras."""
