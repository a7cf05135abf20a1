"""Truth objects (fpe_lab.metrics.truth): one interface over mixtures, toy distributions, grid solutions."""

import pytest
import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.metrics.truth import GridTruth, MixtureTruth, ToyTruth
from fpe_lab.sde import VESDE, VPSDE


def mixture():
    return GaussianMixture([0.4, 0.6], [[-1.0, 0.0], [1.0, 0.5]], [[[0.2, 0.0], [0.0, 0.3]]] * 2,
                           dtype=torch.float64)


def test_mixture_truth_is_the_closed_form_in_float64():
    sde, mix = VPSDE(), mixture()
    truth = MixtureTruth(mix, sde)
    x = torch.randn(20, 2, generator=torch.Generator().manual_seed(0)).to(torch.float32)
    s = truth.score(x, 0.3)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, mix.score(x.double(), 0.3, sde), rtol=0, atol=0)  # the same computation
    torch.testing.assert_close(truth.log_prob(x, 0.3), mix.log_prob(x.double(), 0.3, sde), rtol=0, atol=0)
    assert not torch.allclose(truth.score(x, 0.3), truth.score(x, 0.6))  # the time is used


class FakeToy:
    """The toy-distribution interface, backed by a mixture (fpe_lab.data.toy has the same methods)."""

    def __init__(self, mix):
        self.mix = mix

    def perturbed_score(self, x, t, sde):
        return self.mix.score(x, t, sde).numpy()  # numpy results are accepted

    def perturbed_log_prob(self, x, t, sde):
        return self.mix.log_prob(x, t, sde)


def test_toy_truth_forwards_to_perturbed_methods():
    sde, mix = VESDE(), mixture()
    truth = ToyTruth(FakeToy(mix), sde)
    x = torch.randn(10, 2, dtype=torch.float64)
    torch.testing.assert_close(truth.score(x, 0.2), mix.score(x, 0.2, sde), rtol=0, atol=0)
    torch.testing.assert_close(truth.log_prob(x, 0.2), mix.log_prob(x, 0.2, sde), rtol=0, atol=0)
    with pytest.raises(ValueError, match="perturbed_score"):
        ToyTruth(object(), sde)


class FakeSolution:
    def __init__(self, mix, sde):
        self.mix, self.sde = mix, sde

    def score_at(self, x, t):
        return self.mix.score(torch.as_tensor(x), t, self.sde)

    def log_prob_at(self, x, t):
        return self.mix.log_prob(torch.as_tensor(x), t, self.sde)


def test_grid_truth_forwards_to_solution():
    sde, mix = VPSDE(), mixture()
    truth = GridTruth(FakeSolution(mix, sde))
    x = torch.randn(10, 2, dtype=torch.float64)
    torch.testing.assert_close(truth.score(x, 0.5), mix.score(x, 0.5, sde), rtol=0, atol=0)
    with pytest.raises(ValueError, match="score_at"):
        GridTruth(object())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda tr: tr.score(torch.zeros(3, 2), 1.5), "t must lie"),
        (lambda tr: tr.score(torch.zeros(3, 2), torch.tensor([0.1, 0.2])), "scalar"),
        (lambda tr: tr.log_prob(torch.zeros(3), 0.1), "x must"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call(MixtureTruth(mixture(), VPSDE()))
