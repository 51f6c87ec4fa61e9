"""PyTorch backend of DVT and VT, and its one public face: models from configs, weights in and out
(canonical `.safetensors` and the release's `.pth`), the early-exit engine and ONNX export.
`dvt_mindspore` has the same names."""
from . import timm_registry  # noqa: F401  (registers every DVT and VT name with timm)
from .checkpoint import (
    CHECKPOINT_FORMAT,
    load_weights,
    read_checkpoint,
    read_release_checkpoint,
    save_weights,
    write_checkpoint,
    write_release_checkpoint,
)
from .convert import from_canonical, to_canonical
from .dvt import DVT, DVTStage, ReuseState, check_images, multi_exit_loss
from .engine import AdaptiveDVT, Prediction
from .export import export_onnx as export
from .models import (
    all_exit_logits,
    build_model,
    count_parameters,
    create_model,
    inference_model,
    list_models,
    tensor,
)
from .vt import VTFPN, FilterTokenizer, Projector, RecurrentTokenizer, ResNet, VTModule, VTResNet, VTTransformer


def run_training(args, read_checkpoint=None) -> dict:
    """`dvt train`: the training loop of `dvt_torch.train` (a submodule of that name, so this one has
    another), imported only when used; `read_checkpoint(path)` reads another backend's weight files."""
    from .train import train

    return train(args, read_checkpoint)


__all__ = [
    "AdaptiveDVT", "CHECKPOINT_FORMAT", "DVT", "DVTStage", "Prediction", "ReuseState",
    "all_exit_logits", "build_model", "check_images", "count_parameters", "create_model", "export",
    "from_canonical", "inference_model", "list_models", "load_weights", "multi_exit_loss", "read_checkpoint",
    "read_release_checkpoint", "save_weights", "tensor", "run_training", "to_canonical", "write_checkpoint",
    "write_release_checkpoint",
    "FilterTokenizer", "Projector", "RecurrentTokenizer", "ResNet", "VTFPN", "VTModule", "VTResNet", "VTTransformer",
]
