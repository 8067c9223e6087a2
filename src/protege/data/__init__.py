"""Datasets: bundled digits, Fashion-MNIST from the Debian package, CSV tables."""
from .base import DataSplits, Split
from .loaders import load_data

__all__ = ["DataSplits", "Split", "load_data"]
