"""Framework-neutral DVT specs (pure Python + NumPy): configs, token schedule, FLOPs,
exit policy and the canonical weight format. Importing this never imports a framework."""
from .calibration import (
    DynamicResult,
    SweepPoint,
    check_calibration_data,
    dynamic_evaluate,
    exit_shares,
    find_thresholds,
    release_p_values,
    release_sweep,
    thresholds_for_accuracy,
    thresholds_for_budget,
)
from .configs import (
    DVTConfig,
    StageSpec,
    StemSpec,
    config_from_release_json,
)
from .exit_policy import confidences, exit_indices, predictions, softmax, stops_at_exit
from .io_utils import atomic_write_bytes, atomic_writer, sha256_file
from .models import get_model_config, list_model_names
from .token_schedule import (
    relation_resample_matrix,
    resample_matrix,
    resample_matrix_1d,
    token_grids,
)
from .weight_format import (
    FORMAT_VERSION,
    WeightMetadata,
    check_state_dict,
    load_canonical,
    read_canonical_metadata,
    save_canonical,
)

__all__ = [
    "DVTConfig",
    "StageSpec",
    "StemSpec",
    "config_from_release_json",
    "get_model_config",
    "list_model_names",
    "relation_resample_matrix",
    "resample_matrix",
    "resample_matrix_1d",
    "token_grids",
    "atomic_write_bytes",
    "atomic_writer",
    "sha256_file",
    "FORMAT_VERSION",
    "WeightMetadata",
    "check_state_dict",
    "load_canonical",
    "read_canonical_metadata",
    "save_canonical",
    "DynamicResult",
    "SweepPoint",
    "check_calibration_data",
    "confidences",
    "dynamic_evaluate",
    "exit_indices",
    "exit_shares",
    "find_thresholds",
    "predictions",
    "release_p_values",
    "release_sweep",
    "stops_at_exit",
    "thresholds_for_accuracy",
    "softmax",
    "thresholds_for_budget",
]
