"""Exporting bundles for fast inference (ONNX Runtime); see :mod:`hematoscope.export.onnx`."""
