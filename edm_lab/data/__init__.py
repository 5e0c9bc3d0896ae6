"""Datasets: offline defaults (scikit-learn digits, a 2-D Gaussian mixture)."""
from edm_lab.data.datasets import ArrayDataset, digits, toy2d

__all__ = ["ArrayDataset", "digits", "toy2d"]
