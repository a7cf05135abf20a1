"""fpe_lab.model.ScoreModel: network output → score."""

import pytest
import torch

from fpe_lab.model import ScoreModel
from fpe_lab.nets.mlp import TimeMLP
from fpe_lab.sde import VPSDE


def test_score_is_minus_output_over_sigma_and_t_zero_is_refused():
    torch.manual_seed(0)
    net = TimeMLP(width=8, depth=1).double()
    model = ScoreModel(net, VPSDE())
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0.5, 0.1, 1.0], dtype=torch.float64)
    sigma = VPSDE().marginal(t)[1]
    torch.testing.assert_close(model(x, t), -net(x, t) / sigma[:, None], rtol=0, atol=0)  # the same arithmetic
    with pytest.raises(ValueError, match="t = 0 gives sigma"):
        model(x, torch.tensor([0.5, 0.0, 0.2], dtype=torch.float64))
