"""Shard schema, augmentation and tf.data pipelines."""
