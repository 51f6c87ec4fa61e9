"""PyTorch backend of DVT (the cascade, both reuse mechanisms, stage-wise execution) and of VT."""
from . import timm_registry  # noqa: F401  (registers every DVT and VT name with timm)
from .dvt import DVT, DVTStage, ReuseState, check_images, multi_exit_loss
from .models import create_model, list_models
from .vt import (
    VTFPN,
    FilterTokenizer,
    Projector,
    RecurrentTokenizer,
    ResNet,
    VTModule,
    VTResNet,
    VTTransformer,
    build_model,
    create_vt_model,
)

__all__ = [
    "DVT", "DVTStage", "ReuseState", "check_images", "create_model", "list_models", "multi_exit_loss",
    "FilterTokenizer", "Projector", "RecurrentTokenizer", "ResNet", "VTFPN", "VTModule", "VTResNet", "VTTransformer",
    "build_model", "create_vt_model",
]
