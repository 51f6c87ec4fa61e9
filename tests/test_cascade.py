"""The stage contract's reuse state (dvt_shared.cascade.ReuseState): the one mapping between the state the
engines pass on and the tensors an exported stage graph takes and gives, positionally and by name."""
import numpy as np
import pytest

from dvt_shared import get_model_config
from dvt_shared.adaptive import reuse_tensor_names
from dvt_shared.cascade import ReuseState


@pytest.mark.parametrize("reuse", ["both", "feature", "relation"])
def test_positional_and_named_forms_round_trip(reuse):
    config = get_model_config("dvt_t2t_vit_fmnist", reuse=reuse)
    feature_reuse, relation_reuse = config.feature_reuse, config.relation_reuse
    names = reuse_tensor_names(config, 0)
    features, relations = np.ones((2, 3)), np.zeros((2, 4, 5, 5))
    state = ReuseState(features if feature_reuse else None, relations if relation_reuse else None)
    positional = state.positional()
    assert len(positional) == len(names)
    assert ReuseState.from_positional(positional, names) == state
    assert sorted(state.feeds()) == sorted("prev_" + name for name in names)
    taken = state.map(lambda t: t[[1]])
    assert all(t is None or t.shape[0] == 1 for t in taken)


def test_a_graph_giving_other_tensors_than_named_is_refused():
    with pytest.raises(ValueError, match="1 reuse tensor"):
        ReuseState.from_positional((np.ones(2),), ["features", "relations"])
    with pytest.raises(ValueError, match="reuse tensor"):
        ReuseState.from_positional((np.ones(2),), ["tokens"])
