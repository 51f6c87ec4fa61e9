"""MindSpore backend of DVT and VT, parameter for parameter the PyTorch backend's twin, and its one
public face: models from configs (mindcv-style `create_model`, `list_models`), weights in and out
(canonical `.safetensors` and MindSpore's `.ckpt`), the early-exit engine and MindIR export.
`dvt_torch` has the same names."""
from .checkpoint import (
    CHECKPOINT_FORMAT,
    load_ckpt,
    load_weights,
    read_checkpoint,
    save_ckpt,
    save_weights,
    write_checkpoint,
)
from .convert import from_canonical, to_canonical
from .dvt import DVT, DVTStage, ReuseState, check_images, multi_exit_loss
from .engine import AdaptiveDVT, Prediction
from .export import MindIRAdaptiveDVT as ExportedAdaptiveDVT
from .export import export_mindir as export
from .layers import Attention, Block, PatchEmbed, T2TStem, TokenPerformer
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

__all__ = [
    "AdaptiveDVT", "CHECKPOINT_FORMAT", "DVT", "DVTStage", "ExportedAdaptiveDVT", "Prediction", "ReuseState",
    "all_exit_logits", "build_model", "check_images", "count_parameters", "create_model", "export",
    "from_canonical", "inference_model", "list_models", "load_ckpt", "load_weights", "multi_exit_loss",
    "read_checkpoint", "save_ckpt", "save_weights", "tensor", "to_canonical", "write_checkpoint",
    "Attention", "Block", "PatchEmbed", "T2TStem", "TokenPerformer",
    "FilterTokenizer", "Projector", "RecurrentTokenizer", "ResNet", "VTFPN", "VTModule", "VTResNet", "VTTransformer",
]
