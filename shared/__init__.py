"""Framework-neutral DVT specs (pure Python + NumPy): configs, token schedule, FLOPs,
exit policy and the canonical weight format. Importing this never imports a framework."""
from .configs import (
    DVTConfig,
    StageSpec,
    StemSpec,
    config_from_release_json,
    get_config,
    list_configs,
)
from .token_schedule import (
    relation_resample_matrix,
    resample_matrix,
    resample_matrix_1d,
    token_grids,
)

__all__ = [
    "DVTConfig",
    "StageSpec",
    "StemSpec",
    "config_from_release_json",
    "get_config",
    "list_configs",
    "relation_resample_matrix",
    "resample_matrix",
    "resample_matrix_1d",
    "token_grids",
]
