"""Shared fixtures: one thread per test process, the units every contract test iterates over, a 2-D mixture,
float64 helpers; and the ``gpu`` marker's skip on machines without CUDA.

A new SDE, regularizer or data set added to these lists (or, for regularizers and data sets, to the
package's own list they are read from) inherits every shared contract test.
"""

import pytest
import torch

from fpe_lab import regularizers
from fpe_lab.config import Dataset
from fpe_lab.gmm import GaussianMixture
from fpe_lab.sde import SubVPSDE, VESDE, VPSDE

ALL_SDES = (VESDE(), VPSDE(), SubVPSDE())
"""The forward SDEs with the Score SDE default coefficients."""
SDE_IDS = ("ve", "vp", "subvp")
ALL_REGULARIZERS = regularizers.BUILTINS
"""The built-in regularizer classes (fpe_lab.regularizers.BUILTINS)."""
ALL_DATASETS = tuple(Dataset)
"""Every configurable data set (fpe_lab.config.Dataset; loaded by fpe_lab.data.load)."""


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP spin-waiting between two threads made a
    4×4 U-Net forward ~50× slower (measured 2.4 s vs 0.05 s); the library's own default is one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ALL_SDES, ids=SDE_IDS)
def any_sde(request):
    """Each of the three forward SDEs with the Score SDE default coefficients."""
    return request.param


@pytest.fixture
def mixture_2d() -> GaussianMixture:
    """A two-component 2-D mixture with full covariances, float64."""
    return GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.5, -0.5]],
                           [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]]], dtype=torch.float64)


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype (verification paths)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(before)
