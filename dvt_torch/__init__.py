"""PyTorch backend of DVT: the cascade, both reuse mechanisms, stage-wise execution."""
from . import timm_registry  # noqa: F401  (registers every DVT name with timm)
from .dvt import DVT, DVTStage, ReuseState, check_images, create_model, multi_exit_loss

__all__ = ["DVT", "DVTStage", "ReuseState", "check_images", "create_model", "multi_exit_loss"]
