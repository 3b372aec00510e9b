"""Whole-slide images: reading, tissue mask, tiled cascade, hotspot and report."""
