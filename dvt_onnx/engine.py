"""The shared early-exit loop over per-stage ONNX graphs, run by ONNX Runtime on NumPy arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dvt_shared.adaptive import DEFAULT_MAX_BATCH, AdaptiveEngine
from dvt_shared.cascade import ReuseState
from dvt_shared.exit_policy import MAX_SOFTMAX, ExitPolicy
from dvt_shared.export_manifest import ONNX_FORMAT, ONNX_MANIFEST, read_manifest
from dvt_shared.image_checks import check_finite, check_image_dtype, check_image_shape

# The manifest `dvt_torch.export.export_onnx` writes beside the graphs, and its format tag.
MANIFEST, FORMAT = ONNX_MANIFEST, ONNX_FORMAT


class OnnxAdaptiveDVT(AdaptiveEngine):
    """The shared early-exit loop over the per-stage ONNX graphs, run by ONNX Runtime."""

    def __init__(
        self, onnx_dir, thresholds, max_batch: int = DEFAULT_MAX_BATCH, threads: int | None = None,
        exit_policy: ExitPolicy = MAX_SOFTMAX,
    ):
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        config, self.stages = read_manifest(onnx_dir, MANIFEST, FORMAT, "dvt export --format onnx")
        super().__init__(config, thresholds, max_batch, exit_policy)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = [
            ort.InferenceSession(str(onnx_dir / stage["file"]), options, providers=["CPUExecutionProvider"])
            for stage in self.stages
        ]

    def num_images(self, images: np.ndarray) -> int:
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
        check_image_shape(images.shape, self.config)
        check_image_dtype(images.dtype, images.dtype.kind == "f", np.dtype(np.float32))
        check_finite(np.isfinite(images).reshape(len(images), -1).all(axis=1))
        return images.shape[0]

    def run_stage(self, index: int, images: np.ndarray, state: ReuseState | None):
        # ONNX Runtime reads a dense buffer: strided views (channels-last) are copied once here.
        feeds = {"images": np.ascontiguousarray(images), **(state.feeds() if state is not None else {})}
        outputs = self.sessions[index].run(None, feeds)
        return outputs[0], ReuseState.from_positional(outputs[1:], self.stages[index]["outputs"][1:])

    def take(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return images[rows]

    def take_state(self, state: ReuseState, rows: np.ndarray) -> ReuseState:
        return state.map(lambda t: t[rows])

    def concat(self, batches: list[np.ndarray]) -> np.ndarray:
        return batches[0] if len(batches) == 1 else np.concatenate(batches)

    def concat_states(self, states: list[ReuseState]) -> ReuseState:
        return ReuseState(*(None if parts[0] is None else np.concatenate(parts) for parts in zip(*states)))
