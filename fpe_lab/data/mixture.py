r"""A Gaussian mixture in any dimension D as a data set: exact score, density and NLL at every D.

The law is fixed by (D, K) alone (an internal seed, :data:`MIXTURE_SEED`), so every run, seed and
process sees the same p_0:

    p_0(x) = (1/K) Σ_k N(x; mu_k, sd_k² I_D),   mu_k = 2 u_k,  u_k uniform on the unit sphere S^{D−1},
    sd_k ~ U[0.2, 0.5],

drawn in this order (u_k as normalised N(0, I_D) vectors, then the sd_k) from one float64 generator.
Under x_t | x_0 ~ N(alpha x_0, sigma² I) every component stays isotropic,
C_k(t) = (alpha² sd_k² + sigma²) I, so p_t and ∇ log p_t are closed forms
(:meth:`fpe_lab.gmm.GaussianMixture.score` with ``.mixture``; :class:`fpe_lab.metrics.truth.MixtureTruth`).

Shapes: samples are (n, D) float64. Sampling uses the isotropic form mu_k + sd_k z (O(nD)), the same
draws (component indices, then z ~ N(0, I)) as ``GaussianMixture.sample``, which would form (n, D, D)
Cholesky factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from fpe_lab.checks import check_int
from fpe_lab.gmm import GaussianMixture
from fpe_lab.gmm_lowrank import LowRankGaussianMixture
from fpe_lab.metrics.truth import MixtureTruth
from fpe_lab.sde import LinearSDE

__all__ = ["MixtureData", "LowRankMixtureData", "mixture_data", "lowrank_mixture_data", "MIXTURE_SEED", "MEAN_RADIUS",
           "SD_RANGE", "FACTOR_RANGE"]

MIXTURE_SEED = 20261201
"""The internal seed of the law: the same (D, K) gives the same mixture in every run."""
MEAN_RADIUS = 2.0
"""‖mu_k‖: the means lie on the sphere of this radius (as the 2-D ``gmm`` set's, at distance 2)."""
SD_RANGE = (0.2, 0.5)
"""Component standard deviations are drawn uniformly in this interval."""
FACTOR_RANGE = (0.5, 1.0)
"""Low-rank mixture: the standard deviation along each of a component's r extra directions, drawn uniformly
here."""


@dataclass(frozen=True, eq=False)
class MixtureData:
    """The data set p_0 = (1/K) Σ_k N(mu_k, sd_k² I_D) (see the module docstring).

    Attributes:
        means: (K, D) float64, each of norm :data:`MEAN_RADIUS`.
        sds: (K,) float64 in :data:`SD_RANGE`.
    """

    means: torch.Tensor
    sds: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def weights(self) -> torch.Tensor:
        """(K,) equal weights 1/K, float64."""
        return torch.full((self.n_components,), 1.0 / self.n_components, dtype=torch.float64)

    @cached_property
    def mixture(self) -> GaussianMixture:
        """p_0 as a float64 :class:`~fpe_lab.gmm.GaussianMixture` with covariances sd_k² I (K, D, D)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, self.means, self.sds[:, None, None] ** 2 * eye)

    @property
    def width(self) -> float:
        """The smallest component standard deviation."""
        return float(self.sds.min())

    @property
    def bounds(self) -> tuple[tuple[float, float], ...]:
        """A box per coordinate holding all but < 1e-11 of the mass per coordinate: max |mu| + 7 max sd."""
        r = float(self.means.abs().max()) + 7 * float(self.sds.max())
        return ((-r, r),) * self.dim

    def mean(self) -> torch.Tensor:
        """E x_0 = Σ_k w_k mu_k, shape (D,)."""
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        """Cov x_0 = Σ_k w_k (sd_k² I + mu_k mu_kᵀ) − m mᵀ, shape (D, D)."""
        w, m = self.weights, self.mean()
        second = torch.einsum("k,ki,kj->ij", w, self.means, self.means)
        return (w @ self.sds**2) * torch.eye(self.dim, dtype=torch.float64) + second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n independent samples of p_0, shape (n, D), float64: mu_k + sd_k z with k ~ w, z ~ N(0, I_D).

        The draws equal ``self.mixture.sample(n, generator)`` for the same generator state."""
        check_int("n", n, 0)
        k = (torch.multinomial(self.weights, n, replacement=True, generator=generator) if n
             else torch.zeros(0, dtype=torch.long))
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.sds[k, None] * z

    @cached_property
    def low_rank(self) -> LowRankGaussianMixture:
        """p_0 in the low-rank form (rank 0: sd_k² I), whose score and density cost O(K·D) per point."""
        return LowRankGaussianMixture(self.weights, self.means, self.means.new_zeros(*self.means.shape, 0), self.sds**2)

    def truth(self, sde: LinearSDE) -> MixtureTruth:
        """The exact p_t and score under ``sde`` (closed forms)."""
        return MixtureTruth(self.low_rank, sde)

    def dequantization(self) -> None:
        """Continuous data: no dequantization, NLL in nats."""
        return None

    def __repr__(self) -> str:
        sds = f"[{self.width:.3g}, {float(self.sds.max()):.3g}]"
        return f"MixtureData(D={self.dim}, K={self.n_components}, sd in {sds})"


@dataclass(frozen=True, eq=False)
class LowRankMixtureData:
    """A data set p_0 = Σ_k w_k N(mu_k, U_k U_kᵀ + v_k I) with samples of any ``shape`` (points or images,
    D = prod(shape)); exact p_t and score through :class:`fpe_lab.gmm_lowrank.LowRankGaussianMixture`
    (Woodbury, O(K·D·r) per point)."""

    mixture: LowRankGaussianMixture
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if int(torch.tensor(self.shape).prod()) != self.mixture.dim:
            raise ValueError(f"shape {self.shape} holds {int(torch.tensor(self.shape).prod())} values; the mixture "
                             f"has D = {self.mixture.dim}")

    @property
    def dim(self) -> int:
        return self.mixture.dim

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of p_0, shape (n, *shape), float64 (the mixture's draws, reshaped)."""
        return self.mixture.sample(n, generator).reshape(n, *self.shape)

    def truth(self, sde: LinearSDE) -> MixtureTruth:
        """The exact p_t and score under ``sde`` (closed forms on flattened points)."""
        return MixtureTruth(self.mixture, sde)

    def dequantization(self) -> None:
        """Continuous data: no dequantization, NLL in nats."""
        return None

    def __repr__(self) -> str:
        return f"LowRankMixtureData(shape={self.shape}, {self.mixture!r})"


def mixture_data(dim: int, components: int) -> MixtureData:
    """The mixture data set of dimension ``dim`` (D >= 1) with ``components`` (K >= 1) components.

    Deterministic: means 2 u_k (u_k = g_k/‖g_k‖, g_k ~ N(0, I_D)) and sd_k ~ U[0.2, 0.5], drawn from a
    float64 generator seeded with :data:`MIXTURE_SEED`."""
    check_int("dim", dim, 1)
    check_int("components", components, 1)
    gen = torch.Generator().manual_seed(MIXTURE_SEED)
    g = torch.randn(components, dim, generator=gen, dtype=torch.float64)
    means = MEAN_RADIUS * g / g.norm(dim=-1, keepdim=True)  # D = 1: u = ±1 (a zero draw has probability 0)
    lo, hi = SD_RANGE
    sds = lo + (hi - lo) * torch.rand(components, generator=gen, dtype=torch.float64)
    return MixtureData(means=means, sds=sds)


def lowrank_mixture_data(shape: tuple[int, ...], components: int, rank: int) -> LowRankMixtureData:
    """The mixture data set of :func:`mixture_data` (same means and sds, D = prod(shape)) with ``rank`` extra
    directions per component: Sigma_k = U_k U_kᵀ + sd_k² I, U_k = [c_1 e_1 … c_r e_r], e_j = g_j/‖g_j‖ with
    g_j ~ N(0, I_D), c_j ~ U[FACTOR_RANGE], drawn after the means and sds from the same generator."""
    dim = 1
    for n in shape:
        dim *= check_int("shape entry", n, 1)
    check_int("rank", rank, 0)
    base = mixture_data(dim, components)
    gen = torch.Generator().manual_seed(MIXTURE_SEED)
    torch.randn(components, dim, generator=gen, dtype=torch.float64)  # the means' and sds' draws, as above
    torch.rand(components, generator=gen, dtype=torch.float64)
    g = torch.randn(components, dim, rank, generator=gen, dtype=torch.float64)
    lo, hi = FACTOR_RANGE
    c = lo + (hi - lo) * torch.rand(components, rank, generator=gen, dtype=torch.float64)
    factors = g / g.norm(dim=1, keepdim=True) * c[:, None, :] if rank else g
    mix = LowRankGaussianMixture(base.weights, base.means, factors, base.sds**2)
    return LowRankMixtureData(mix, tuple(shape))
