"""Data layer: one image decoder, dataset readers, taxonomy mapping, splits, quality checks."""
