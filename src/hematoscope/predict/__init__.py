"""Classifying many images fast: path expansion (files, folders, globs, zips) and a pipelined
decoder that overlaps reading and decoding with inference.

    >>> from hematoscope import load_bundle
    >>> from hematoscope.predict import predict_paths
    >>> pred = predict_paths(load_bundle("my_bundle"), ["slide_01/", "more.zip"])  # doctest: +SKIP
    >>> pred.differential().to_dict()  # doctest: +SKIP
"""
from hematoscope.data.decode import DecodedBatch, decode_batches
from hematoscope.data.sources import ImageSource, expand_paths
from hematoscope.predict.options import InferenceOptions
from hematoscope.predict.pipeline import iter_predictions, load_for_inference, predict_paths, predict_sources

__all__ = ["DecodedBatch", "ImageSource", "InferenceOptions", "decode_batches", "expand_paths", "iter_predictions",
           "load_for_inference", "predict_paths", "predict_sources"]
