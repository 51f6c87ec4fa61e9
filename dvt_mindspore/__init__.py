"""The DVT cascade and VT in MindSpore, parameter for parameter the PyTorch backend's twin."""
from .dvt import DVT, DVTStage, ReuseState, check_images, multi_exit_loss
from .layers import Attention, Block, PatchEmbed, T2TStem, TokenPerformer
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
    "Attention",
    "Block",
    "DVT",
    "DVTStage",
    "PatchEmbed",
    "ReuseState",
    "T2TStem",
    "TokenPerformer",
    "check_images",
    "create_model",
    "list_models",
    "multi_exit_loss",
    "FilterTokenizer",
    "Projector",
    "RecurrentTokenizer",
    "ResNet",
    "VTFPN",
    "VTModule",
    "VTResNet",
    "VTTransformer",
    "build_model",
    "create_vt_model",
]
