"""Training data in the real formats (Visual Genome, TextOCR, LAION webdataset shards,
region instructions) and the step-indexed mixing of several datasets.

Builders are looked up by name through :mod:`click4caption.registry`.
"""
from click4caption.data.sources import BatchSource, SkipSample
from click4caption.errors import DataError
from click4caption.data.mixing import MixedBatches, build_sources, make_loader, split_meta

__all__ = ["BatchSource", "DataError", "MixedBatches", "SkipSample", "build_sources", "make_loader", "split_meta"]
