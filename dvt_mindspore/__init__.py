"""The DVT cascade in MindSpore, parameter for parameter the PyTorch backend's twin."""
from .dvt import DVT, DVTStage, ReuseState, check_images, create_model, multi_exit_loss
from .layers import Attention, Block, PatchEmbed, T2TStem, TokenPerformer

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
    "multi_exit_loss",
]
