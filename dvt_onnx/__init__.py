"""Real early exit over the per-stage ONNX graphs of `dvt export --format onnx`, with ONNX Runtime.

Needs NumPy and onnxruntime only: serving a DVT this way never imports a training framework.
"""
import numpy as np

from .engine import FORMAT, MANIFEST, OnnxAdaptiveDVT

AdaptiveDVT = OnnxAdaptiveDVT


def tensor(images: np.ndarray) -> np.ndarray:
    """A NumPy batch as this backend's input: itself."""
    return np.asarray(images)


__all__ = ["AdaptiveDVT", "FORMAT", "MANIFEST", "OnnxAdaptiveDVT", "tensor"]
