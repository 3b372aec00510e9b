"""Matching detections to ground-truth centroids and the resulting metrics."""
