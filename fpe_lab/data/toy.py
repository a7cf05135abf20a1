r"""2D toy data sets as *distributions*: samples and the exact density they are drawn from.

Every data set here is defined as a base measure mu on R² smoothed by an isotropic Gaussian of a
stated width w,

    p_0 = mu ⊛ N(0, w² I),        sample:  x = y + w z,  y ~ mu,  z ~ N(0, I),

so "the density describes the same distribution as the samples" holds by definition, not by a fit.
Under a linear SDE with x_t | x_0 ~ N(alpha x_0, sigma² I) the perturbed density is the pushed
base measure (alpha·)_# mu smoothed with the width s(t) = sqrt(alpha² w² + sigma²):

    p_t(x) = ∫ N(x; alpha y, s² I) dmu(y),
    ∇ log p_t(x) = (E[alpha y | x] − x) / s²,    E[alpha y | x] under the posterior ∝ N(x; alpha y, s²) dmu(y).

The base measures:

* ``checkerboard``: uniform on the 8 black squares (side 2) of a 4×4 board on [−4, 4]², w = 0.2;
  closed form with the normal CDF, a product over the axes for each square.
* ``8gaussians``: 8 equal point masses on the circle of radius 2√2, w = 0.5/√2 (FFJORD's set).
* ``gmm``: any :class:`~fpe_lab.gmm.GaussianMixture` in 2D (default: four Gaussians at (±2, 0),
  (0, ±2) with standard deviations 0.2, 0.3, 0.25, 0.35); it *is* its own density.
* ``rings``: 4 concentric circles of radii 3, 2.25, 1.5, 0.75, mass 1/4 each, uniform in angle,
  w = 0.15.
* ``moons``: sklearn's two half circles (outer: (cos θ, sin θ); inner: (1 − cos θ, ½ − sin θ),
  θ ∈ [0, π]), shifted by (−½, −¼) and scaled by 2, mass ½ each, uniform in θ, w = 0.2.
* ``swissroll``: the spiral u ↦ (u cos u, u sin u)/5, u uniform on [1.5π, 4.5π], w = 0.2
  (sklearn's roll, the (x, z) plane, scaled by 1/5 as in FFJORD).
* ``imbalanced``: a Gaussian mixture with very unequal weights and widths, the held-out set made to
  stress rare, narrow modes: weight 0.80 at the origin (sd 0.6), 0.15 at (2.5, 2.5) (sd 0.15),
  0.04 at (−2.5, 2.5) (sd 0.2) and 0.01 at (0, −3) (sd 0.15); w = 0.15.
* ``pinwheel``: 5 spiral arms y = 2 rho (cos φ, sin φ), φ = 2πk/5 + e^rho/4, with rho ~ N(1, 0.3²)
  truncated to [0.1, 1.9], mass 1/5 each, w = 0.2. (FFJORD's pinwheel puts its 0.2 spread only
  tangentially; here it is an isotropic smoothing of the arms.)

For the curve measures (rings, moons, swissroll, pinwheel) the integral over the curve is a
composite Gauss–Legendre quadrature in the curve parameter with panels no longer than
``panel_width``·w in arc length (default 2 w, ``order`` = 16 nodes per panel), evaluated with
logsumexp. Near the curve the integrand along it is a Gaussian of width w (s(t) ≥ alpha w in the
perturbed case, where the curve also shrinks by alpha); at a distance d on the convex side it
narrows to w/sqrt(1 + d·curvature). Measured by halving the panels (tests/data/test_toy.py): the
change in log p_t is ≤ 1e-13 (round-off) where p_t ≥ e^-30·max and ≤ 3e-9 in the far corners of
1.2× the box (p_t ~ e^-300·max); rings also agree with the Bessel closed form to 1e-10.

The quadrature is itself a Gaussian mixture, so the perturbed density and score it gives satisfy
the Fokker–Planck and score FPE exactly, whatever the quadrature error.

Widths are chosen so that the 256² grid on each ``bounds`` has ≥ 4 cells per w (``cells_per_width``:
checkerboard 4.9, 8gaussians 9.1, gmm 5.8, rings 4.8, moons 6.1, swissroll 6.4, pinwheel 5.1,
imbalanced 4.04), and
the bounds leave ≥ 6 w (gmm: 7 sd of its widest component) between the support of mu and the walls,
so the mass outside the box is < 1e-8.
"""

from __future__ import annotations

import abc
import logging
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from fpe_lab.gmm import GaussianMixture
from fpe_lab.groundtruth.grid import Grid
from fpe_lab.progress import progress_bar as tqdm
from fpe_lab.shapes import batch_time

__all__ = [
    "ToyDistribution",
    "Checkerboard",
    "EightGaussians",
    "GMM",
    "CurveDistribution",
    "Rings",
    "Moons",
    "SwissRoll",
    "Pinwheel",
    "Imbalanced",
    "TOY_NAMES",
    "toy_distribution",
]


if TYPE_CHECKING:
    from fpe_lab.metrics.truth import Truth

log = logging.getLogger(__name__)

Bounds = tuple[tuple[float, float], tuple[float, float]]

# Points per evaluation chunk × quadrature nodes: bounds the (chunk, K) work arrays to ~32 MiB.
_CHUNK_ELEMENTS = 1 << 22
_LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------- checks
def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a nonnegative int; got {n!r}")
    return int(n)


def _check_x(x) -> torch.Tensor:
    """x as a float64 tensor of shape (n, 2) (differentiable: a float64 input is used as is)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape (n, 2); got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (n, 2); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor; got dtype {x.dtype}")
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        bad = x[~torch.isfinite(x)][0].item()
        raise ValueError(f"x must be finite; got non-finite value {bad!r}")
    return x


def _check_width(w, name: str = "width") -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
        raise ValueError(f"{name} must be a finite positive number; got {w!r}")
    return float(w)


def _marginal(sde, t, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) of shape (n,) in float64 for t a scalar or of shape (n,)."""
    if not callable(getattr(sde, "marginal", None)):
        raise ValueError(
            f"sde must be a linear SDE with marginal(t) -> (alpha, sigma); got {type(sde).__name__}"
        )
    alpha, sigma = sde.marginal(batch_time(t, x))
    alpha = torch.as_tensor(alpha, dtype=torch.float64).expand(x.shape[:1])
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[:1])
    if not (torch.isfinite(alpha).all() and (alpha > 0).all() and torch.isfinite(sigma).all() and (sigma >= 0).all()):
        raise ValueError("sde.marginal(t) must give finite alpha > 0 and sigma >= 0")
    return alpha, sigma


def _row_chunks(n: int, k: int, progress: bool):
    """Slices of the n evaluation points so that each chunk holds about _CHUNK_ELEMENTS / k points."""
    size = max(1, _CHUNK_ELEMENTS // max(k, 1))
    starts = range(0, n, size)
    if progress and len(starts) > 1:
        starts = tqdm(starts, desc="toy density", unit="chunk", leave=False)
    for a in starts:
        yield slice(a, min(a + size, n))


# ---------------------------------------------------------------------------------------- base
class ToyDistribution(abc.ABC):
    """A 2D data distribution p_0 = mu ⊛ N(0, w² I) with exact samples, density and perturbed score.

    Shapes: points x are (n, 2); log-densities are (n,); scores are (n, 2); all torch float64.
    ``t`` is a scalar or of shape (n,); ``sde`` is any object with ``marginal(t) -> (alpha, sigma)``
    such that x_t | x_0 ~ N(alpha x_0, sigma² I) (VESDE, VPSDE, SubVPSDE).
    """

    name: ClassVar[str]

    @property
    @abc.abstractmethod
    def bounds(self) -> Bounds:
        """A box ((lo, hi), (lo, hi)) holding all but a negligible part of the mass of p_0."""

    @property
    @abc.abstractmethod
    def width(self) -> float:
        """The smoothing width w of p_0 = mu ⊛ N(0, w² I) (for a general mixture: its smallest sd)."""

    @property
    def mixture(self) -> GaussianMixture | None:
        """p_0 as an exact GaussianMixture when it is one, else None."""
        return None

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n independent samples of p_0, shape (n, 2), float64; deterministic for a seeded generator."""

    @abc.abstractmethod
    def _log_prob_and_score(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, want_score: bool, progress: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log p_t(x) (n,) and, if asked, ∇ log p_t(x) (n, 2) for per-point alpha, sigma of shape (n,)."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p_0(x), shape (n,), float64, differentiable in x."""
        x = _check_x(x)
        one = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        return self._log_prob_and_score(x, one, torch.zeros_like(one), False, False)[0]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """∇ log p_0(x), shape (n, 2), float64."""
        x = _check_x(x)
        one = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        return self._score(x, one, torch.zeros_like(one))

    def perturbed_log_prob(self, x: torch.Tensor, t, sde) -> torch.Tensor:
        """log p_t(x) under the linear SDE ``sde``, shape (n,), float64, differentiable in x."""
        x = _check_x(x)
        alpha, sigma = _marginal(sde, t, x)
        return self._log_prob_and_score(x, alpha, sigma, False, False)[0]

    def perturbed_score(self, x: torch.Tensor, t, sde) -> torch.Tensor:
        """∇_x log p_t(x) = (E[alpha y | x] − x)/s², s² = alpha² w² + sigma², shape (n, 2), float64."""
        x = _check_x(x)
        alpha, sigma = _marginal(sde, t, x)
        return self._score(x, alpha, sigma)

    def _score(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        score = self._log_prob_and_score(x, alpha, sigma, True, False)[1]
        if score is None:
            raise RuntimeError(f"{type(self).__name__}._log_prob_and_score returned no score though asked for one")
        return score

    def score_fn(self, sde):
        """The exact perturbed score as ``score_fn(x, t) -> s`` in the dtype of x, interchangeable with a
        network (computed in float64)."""
        return lambda x, t: self.perturbed_score(x, t, sde).to(x.dtype)

    def density(self, grid: Grid) -> np.ndarray:
        """p_0 at the cell centres of a 2D grid, shape ``grid.shape``, float64."""
        if not isinstance(grid, Grid) or grid.ndim != 2:
            raise ValueError(f"grid must be a 2D fpe_lab.groundtruth.Grid; got {grid!r}")
        x = torch.from_numpy(grid.coords.reshape(-1, 2)).to(torch.float64)
        log.debug("p_0 of %s on a %s grid over %s", self.name, grid.shape, grid.bounds)
        one = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        with torch.no_grad():
            lp, _ = self._log_prob_and_score(x, one, torch.zeros_like(one), False, True)
        return lp.exp().reshape(grid.shape).numpy()

    def truth(self, sde) -> Truth:
        """The exact p_t and score under ``sde``: closed forms for a mixture, quadrature otherwise."""
        from fpe_lab.metrics.truth import MixtureTruth, ToyTruth

        return MixtureTruth(self.mixture, sde) if self.mixture is not None else ToyTruth(self, sde)

    def dequantization(self) -> None:
        """Continuous data: no dequantization, NLL in nats."""
        return None

    def cells_per_width(self, n_cells: int = 256) -> float:
        """w divided by the cell size of an n_cells² grid on ``bounds`` (the coarser axis)."""
        return self.width / max((hi - lo) / n_cells for lo, hi in self.bounds)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, width={self.width:g})"


# ---------------------------------------------------------------------------------------- mixtures
class _MixtureDistribution(ToyDistribution):
    """A toy set that is exactly a Gaussian mixture: every method delegates to it."""

    @property
    @abc.abstractmethod
    def mixture(self) -> GaussianMixture: ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mixture.sample(_check_n(n), generator=generator).to(torch.float64)

    def _log_prob_and_score(self, x, alpha, sigma, want_score, progress):
        gm = self.mixture
        means, covs, log_w = gm.means.to(x.device), gm.covs.to(x.device), torch.log(gm.weights).to(x.device)
        a = alpha[:, None, None]
        mean = a * means[None]  # (n, K, 2)
        eye = torch.eye(2, dtype=x.dtype, device=x.device)
        cov = a[..., None] ** 2 * covs[None] + sigma[:, None, None, None] ** 2 * eye
        lps, scores = [], []
        for sl in _row_chunks(x.shape[0], gm.n_components, progress):
            chol = torch.linalg.cholesky(cov[sl])
            diff = (x[sl, None, :] - mean[sl]).unsqueeze(-1)
            white = torch.linalg.solve_triangular(chol, diff, upper=False)
            logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            log_wn = log_w[None] - 0.5 * (white.squeeze(-1).pow(2).sum(-1) + logdet + 2 * _LOG_2PI)
            lps.append(torch.logsumexp(log_wn, dim=-1))
            if want_score:
                comp = -torch.linalg.solve_triangular(chol.transpose(-1, -2), white, upper=True).squeeze(-1)
                scores.append((torch.softmax(log_wn, dim=-1).unsqueeze(-1) * comp).sum(-2))
        lp = torch.cat(lps) if lps else x.new_zeros(0)
        return lp, (torch.cat(scores) if scores else x.new_zeros(0, 2)) if want_score else None


@dataclass(frozen=True, repr=False)
class EightGaussians(_MixtureDistribution):
    """8 equal Gaussians of sd w = 0.5/√2 centred on the circle of radius 4/√2 at angles kπ/4 (FFJORD)."""

    name: ClassVar[str] = "8gaussians"
    radius: float = 4 / math.sqrt(2)
    std: float = 0.5 / math.sqrt(2)

    def __post_init__(self) -> None:
        _check_width(self.radius, "radius")
        _check_width(self.std, "std")

    @property
    def bounds(self) -> Bounds:
        r = self.radius + 6 * self.std  # 6 sd: the mass outside is < 1e-8
        return ((-r, r), (-r, r))

    @property
    def width(self) -> float:
        return self.std

    @cached_property
    def mixture(self) -> GaussianMixture:
        ang = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        means = self.radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)
        covs = self.std**2 * torch.eye(2, dtype=torch.float64).expand(8, 2, 2)
        return GaussianMixture(torch.full((8,), 1 / 8, dtype=torch.float64), means, covs.clone())


def _default_gmm() -> GaussianMixture:
    means = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    sd = torch.tensor([0.2, 0.3, 0.25, 0.35], dtype=torch.float64)
    covs = sd[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64)
    return GaussianMixture(torch.full((4,), 0.25, dtype=torch.float64), means, covs)


@dataclass(frozen=True, repr=False, eq=False)
class GMM(_MixtureDistribution):
    """Any 2D Gaussian mixture as a toy set (default: the 4-Gaussian test mixture of the ground-truth
    benchmarks, docs/conventions.md).

    ``width`` is the smallest component standard deviation; ``bounds`` is the box of the means ± 7 sd
    of the widest direction, made square.
    """

    name: ClassVar[str] = "gmm"
    gaussian_mixture: GaussianMixture = field(default_factory=_default_gmm)

    def __post_init__(self) -> None:
        gm = self.gaussian_mixture
        if not isinstance(gm, GaussianMixture) or gm.dim != 2:
            raise ValueError(f"gaussian_mixture must be a 2D GaussianMixture; got {gm!r}")
        if gm.means.dtype != torch.float64:
            object.__setattr__(
                self,
                "gaussian_mixture",
                GaussianMixture(gm.weights.double(), gm.means.double(), gm.covs.double()),
            )

    @property
    def mixture(self) -> GaussianMixture:
        return self.gaussian_mixture

    @property
    def width(self) -> float:
        return float(torch.linalg.eigvalsh(self.mixture.covs).min().sqrt())

    @property
    def bounds(self) -> Bounds:
        sd_max = float(torch.linalg.eigvalsh(self.mixture.covs).max().sqrt())
        r = float(self.mixture.means.abs().max()) + 7 * sd_max  # 7 sd: mass outside < 1e-11
        return ((-r, r), (-r, r))


@dataclass(frozen=True, repr=False)
class Imbalanced(_MixtureDistribution):
    """Four Gaussians with weights 0.80, 0.15, 0.04, 0.01 and standard deviations 0.6, 0.15, 0.2, 0.15:
    one broad mode that holds most of the mass and three narrow ones, the rarest holding 1%.

    It stresses what the other sets do not: a score must resolve modes that few training samples
    visit, next to one that dominates the loss. ``bounds`` is ±4.75: 7 sd of the broad mode, ≥ 6 sd
    beyond every narrow one (mass outside < 1e-9), and 4 cells per narrowest sd on a 256² grid.
    """

    name: ClassVar[str] = "imbalanced"

    @property
    def bounds(self) -> Bounds:
        return ((-4.75, 4.75), (-4.75, 4.75))

    @property
    def width(self) -> float:
        return 0.15

    @cached_property
    def mixture(self) -> GaussianMixture:
        weights = torch.tensor([0.80, 0.15, 0.04, 0.01], dtype=torch.float64)
        means = torch.tensor([[0.0, 0.0], [2.5, 2.5], [-2.5, 2.5], [0.0, -3.0]], dtype=torch.float64)
        sd = torch.tensor([0.6, 0.15, 0.2, 0.15], dtype=torch.float64)
        return GaussianMixture(weights, means, sd[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------- checkerboard
def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 − e^d) for d < 0, accurate for all d (Mächler 2012)."""
    return torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _log_normal_interval(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Φ(hi) − Φ(lo)) for lo < hi, accurate in both tails (reflects so that the interval sits left)."""
    flip = lo + hi > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    lb = torch.special.log_ndtr(b)
    return lb + _log1mexp(torch.special.log_ndtr(a) - lb)


def _log_phi(u: torch.Tensor) -> torch.Tensor:
    return -0.5 * u * u - 0.5 * _LOG_2PI


@dataclass(frozen=True, repr=False)
class Checkerboard(ToyDistribution):
    r"""Uniform on the 8 black squares [a_k, a_k + 2]×[b_k, b_k + 2] of a 4×4 board on [−4, 4]², ⊛ N(0, w²I).

    Square (i, j), i, j ∈ {0..3} with lower-left corner (2i − 4, 2j − 4), is black when i + j is even
    (FFJORD's checkerboard scaled by 2). With s² = alpha² w² + sigma²,

        p_t(x) = Σ_k (1/8) Π_{d=1,2} [Φ((alpha hi_kd − x_d)/s) − Φ((alpha lo_kd − x_d)/s)] / (2 alpha).
    """

    name: ClassVar[str] = "checkerboard"
    w: float = 0.2

    def __post_init__(self) -> None:
        _check_width(self.w, "w")

    @property
    def width(self) -> float:
        return self.w

    @property
    def bounds(self) -> Bounds:
        r = 4 + max(1.0, 6 * self.w)  # ≥ 5 w beyond the board
        return ((-r, r), (-r, r))

    @cached_property
    def _lower_corners(self) -> torch.Tensor:
        """(8, 2) lower-left corners of the black squares."""
        ij = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
        return torch.tensor([[2.0 * i - 4, 2.0 * j - 4] for i, j in ij], dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        n = _check_n(n)
        k = torch.randint(0, 8, (n,), generator=generator)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return self._lower_corners[k] + 2 * u + self.w * z

    def _log_prob_and_score(self, x, alpha, sigma, want_score, progress):
        s = torch.sqrt(alpha**2 * self.w**2 + sigma**2)[:, None, None]  # (n, 1, 1)
        a = alpha[:, None, None]
        lo = a * self._lower_corners.to(x.device)[None]  # (n, 8, 2)
        hi = lo + 2 * a
        xs = x[:, None, :]
        u_hi, u_lo = (hi - xs) / s, (lo - xs) / s
        log_axis = _log_normal_interval(u_lo, u_hi)  # (n, 8, 2): log of the axis factor before 1/(2 alpha)
        log_k = log_axis.sum(-1) - math.log(8) - 2 * torch.log(2 * a[..., 0])  # (n, 8)
        lp = torch.logsumexp(log_k, dim=-1)
        if not want_score:
            return lp, None
        # d/dx_d log[Φ(u_hi) − Φ(u_lo)] = −(φ(u_hi) − φ(u_lo)) / (s (Φ(u_hi) − Φ(u_lo)))
        dlog = -(torch.exp(_log_phi(u_hi) - log_axis) - torch.exp(_log_phi(u_lo) - log_axis)) / s
        r = torch.softmax(log_k, dim=-1)
        return lp, (r.unsqueeze(-1) * dlog).sum(-2)


# ---------------------------------------------------------------------------------------- curves
@dataclass(frozen=True, repr=False)
class CurveDistribution(ToyDistribution):
    r"""mu = Σ_k m_k (c_k)_# nu_k: a measure on parametrised curves c_k: [0, 1] → R², smoothed by N(0, w² I).

    nu_k has density q_k(u) on [0, 1] (uniform unless a subclass says otherwise). The density

        p_t(x) = Σ_k m_k ∫_0^1 q_k(u) N(x; alpha c_k(u), s² I) du,   s² = alpha² w² + sigma²,

    is a composite Gauss–Legendre quadrature with ``order`` nodes on each of P_k equal panels in u,
    P_k = ceil(max_u |c_k'(u)| / (panel_width · w)), i.e. panels at most ``panel_width``·w long in
    arc length; so it is a mixture of K = order·Σ P_k isotropic Gaussians, summed with logsumexp.
    Points are processed in Morton order in chunks; a chunk skips every panel whose contribution is
    bounded (ball around the panel) below e^-45 of a lower bound of p for all its points, which
    changes nothing beyond round-off (tested against the full sum).
    """

    w: float = 0.2
    panel_width: float = 2.0
    order: int = 16

    def __post_init__(self) -> None:
        _check_width(self.w, "w")
        _check_width(self.panel_width, "panel_width")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 1 <= self.order <= 64:
            raise ValueError(f"order must be an int in [1, 64]; got {self.order!r}")

    @property
    def width(self) -> float:
        return self.w

    # -- the base measure, defined by subclasses
    @property
    @abc.abstractmethod
    def piece_masses(self) -> tuple[float, ...]:
        """m_k, summing to 1."""

    @abc.abstractmethod
    def curve(self, k: int, u: torch.Tensor) -> torch.Tensor:
        """c_k(u) for u of shape (m,) in [0, 1]; returns (m, 2) float64."""

    def sample_parameter(self, k: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """n draws of u ~ nu_k, shape (n,) float64 (default: uniform on [0, 1])."""
        return torch.rand(n, generator=generator, dtype=torch.float64)

    def log_parameter_density(self, k: int, u: torch.Tensor) -> torch.Tensor:
        """log q_k(u), shape of u (default: 0, uniform)."""
        return torch.zeros_like(u)

    # -- quadrature
    def n_panels(self, k: int) -> int:
        u = torch.linspace(0, 1, 4097, dtype=torch.float64)
        c = self.curve(k, u)
        speed = float((c[1:] - c[:-1]).norm(dim=-1).max() * (len(u) - 1))
        return max(1, math.ceil(speed / (self.panel_width * self.w)))

    @cached_property
    def nodes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Quadrature nodes (K, 2) on the curves and log-weights (K,) with logsumexp(log-weights) ≈ 0."""
        nodes_11, weights_11 = np.polynomial.legendre.leggauss(self.order)  # on [-1, 1]
        gx = torch.from_numpy((nodes_11 + 1) / 2)
        gw = torch.from_numpy(weights_11 / 2)
        points, logw = [], []
        for k, m in enumerate(self.piece_masses):
            p = self.n_panels(k)
            left = torch.arange(p, dtype=torch.float64) / p
            u = (left[:, None] + gx[None] / p).reshape(-1)
            wq = (gw[None] / p).expand(p, -1).reshape(-1)
            points.append(self.curve(k, u))
            logw.append(math.log(m) + torch.log(wq) + self.log_parameter_density(k, u))
        return torch.cat(points), torch.cat(logw)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        n = _check_n(n)
        masses = torch.tensor(self.piece_masses, dtype=torch.float64)
        k = (torch.multinomial(masses, n, replacement=True, generator=generator) if n
             else torch.zeros(0, dtype=torch.long))
        y = torch.empty(n, 2, dtype=torch.float64)
        for j in range(len(masses)):
            sel = k == j
            y[sel] = self.curve(j, self.sample_parameter(j, int(sel.sum()), generator))
        return y + self.w * torch.randn(n, 2, generator=generator, dtype=torch.float64)

    @cached_property
    def panels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per panel (nodes ``order``·P … ``order``·P + order − 1): centre (P, 2), radius (P,) and
        log of its total weight (P,), for bounding a panel's contribution from above."""
        c, logw = self.nodes
        c = c.reshape(-1, self.order, 2)
        centre = c.mean(1)
        radius = (c - centre[:, None]).norm(dim=-1).amax(1)
        return centre, radius, torch.logsumexp(logw.reshape(-1, self.order), dim=-1)

    def _log_prob_and_score(self, x, alpha, sigma, want_score, progress):
        c, logw = (v.to(x.device) for v in self.nodes)
        centre, radius, log_wp = (v.to(x.device) for v in self.panels)
        # log m_j q_j − |x − alpha c_j|²/(2 s²) + |x|²/(2 s²) as one matmul of per-point features
        # (alpha x/s², alpha²/s², 1) with per-node features (c_j, −|c_j|²/2, log-weight_j).
        node_feat = torch.cat([c, -0.5 * c.pow(2).sum(-1, keepdim=True), logw[:, None]], dim=-1)  # (K, 4)
        s2 = (alpha**2 * self.w**2 + sigma**2)[:, None]  # (n, 1)
        # Points in Morton order, so that each chunk covers a compact patch and most panels are far.
        order = _morton_order(x.detach())
        inverse = torch.argsort(order)
        xo, ao, vo = x[order], alpha[order, None], s2[order]
        lps, scores = [], []
        for sl in _row_chunks(x.shape[0], max(c.shape[0], _CHUNK_ELEMENTS // _PRUNE_CHUNK), progress):
            xa, a, v = xo[sl], ao[sl], vo[sl]
            keep = _panels_needed(xa.detach(), a.detach(), v.detach(), node_feat, centre, radius, log_wp, self.order)
            cn, nf = c[keep], node_feat[keep]
            point_feat = torch.cat([a * xa / v, a**2 / v, torch.ones_like(v)], dim=-1)  # (m, 4)
            log_n = point_feat @ nf.T  # (m, K')
            top = log_n.amax(-1, keepdim=True).detach()
            e = torch.exp(log_n - top)
            total = e.sum(-1, keepdim=True)
            lp = top + torch.log(total) - 0.5 * xa.pow(2).sum(-1, keepdim=True) / v - torch.log(2 * math.pi * v)
            lps.append(lp[:, 0])
            if want_score:
                mean = a * (e @ cn) / total  # E[alpha y | x]
                scores.append((mean - xa) / v)
        if not lps:
            return x.new_zeros(0), (x.new_zeros(0, 2) if want_score else None)
        lp = torch.cat(lps)[inverse]
        return lp, (torch.cat(scores)[inverse] if want_score else None)


# Panels whose bound is this far below a point's log-density are dropped for it: each contributes
# < e^-45 ≈ 3e-20 of p, all of them (≤ ~10^3 panels) < 1e-16 relative, below float64 round-off.
_PRUNE_NATS = 45.0
# Points per chunk for the curve sums: small enough to be a compact patch in Morton order.
_PRUNE_CHUNK = 2048


def _panels_needed(x, alpha, s2, node_feat, centre, radius, log_wp, order) -> torch.Tensor:
    """Indices of the quadrature nodes of the panels that matter for any point of the chunk.

    In the shifted log space of ``node_feat`` a panel contributes at most
    log W_P − dist(x, alpha·ball(centre_P, radius_P))²/(2 s²) + |x|²/(2 s²), and log p is at least
    the term of any single node (here each panel's middle node). A panel is kept when its bound
    comes within ``_PRUNE_NATS`` of that lower bound for some point.
    """
    mid = node_feat[order // 2 :: order]  # (P, 4): one node per panel
    point_feat = torch.cat([alpha * x / s2, alpha**2 / s2, torch.ones_like(s2)], dim=-1)
    lower = (point_feat @ mid.T).amax(-1, keepdim=True)  # (m, 1)
    d2 = (x.pow(2).sum(-1, keepdim=True) - 2 * alpha * (x @ centre.T) + alpha**2 * centre.pow(2).sum(-1)).clamp_min(0)
    gap = (d2.sqrt() - alpha * radius).clamp_min(0)  # (m, P)
    upper = log_wp - 0.5 * (gap.pow(2) - x.pow(2).sum(-1, keepdim=True)) / s2
    panels = torch.nonzero((upper > lower - _PRUNE_NATS).any(0)).squeeze(-1)
    return (panels[:, None] * order + torch.arange(order, device=x.device)).reshape(-1)


def _morton_order(x: torch.Tensor) -> torch.Tensor:
    """Permutation sorting points (n, 2) along a Z-order curve over 2^10 × 2^10 cells of their box."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    lo, hi = x.amin(0), x.amax(0)
    cells = ((x - lo) / (hi - lo).clamp_min(1e-300) * 1023).long().clamp(0, 1023)

    def spread(v: torch.Tensor) -> torch.Tensor:
        v = (v | (v << 8)) & 0x00FF00FF
        v = (v | (v << 4)) & 0x0F0F0F0F
        v = (v | (v << 2)) & 0x33333333
        return (v | (v << 1)) & 0x55555555

    return torch.argsort(spread(cells[:, 0]) | (spread(cells[:, 1]) << 1))


@dataclass(frozen=True, repr=False)
class Rings(CurveDistribution):
    """4 concentric circles, radii 3, 2.25, 1.5, 0.75, mass 1/4 each, uniform in angle, ⊛ N(0, w² I)."""

    name: ClassVar[str] = "rings"
    w: float = 0.15
    radii: ClassVar[tuple[float, ...]] = (3.0, 2.25, 1.5, 0.75)

    @property
    def bounds(self) -> Bounds:
        r = 3 + max(1.0, 6 * self.w)
        return ((-r, r), (-r, r))

    @property
    def piece_masses(self) -> tuple[float, ...]:
        return (0.25,) * 4

    def curve(self, k: int, u: torch.Tensor) -> torch.Tensor:
        th = 2 * math.pi * u
        return self.radii[k] * torch.stack([torch.cos(th), torch.sin(th)], dim=-1)


@dataclass(frozen=True, repr=False)
class Moons(CurveDistribution):
    """Two half circles (sklearn's make_moons, shifted by (−½, −¼), scaled by 2), mass ½ each, ⊛ N(0, w² I).

    Outer: 2((cos θ, sin θ) − (½, ¼)); inner: 2((1 − cos θ, ½ − sin θ) − (½, ¼)); θ = πu uniform.
    """

    name: ClassVar[str] = "moons"
    w: float = 0.2

    @property
    def bounds(self) -> Bounds:
        r = 3 + max(1.0, 6 * self.w)
        return ((-r, r), (-r, r))

    @property
    def piece_masses(self) -> tuple[float, ...]:
        return (0.5, 0.5)

    def curve(self, k: int, u: torch.Tensor) -> torch.Tensor:
        th = math.pi * u
        if k == 0:
            xy = torch.stack([torch.cos(th), torch.sin(th)], dim=-1)
        else:
            xy = torch.stack([1 - torch.cos(th), 0.5 - torch.sin(th)], dim=-1)
        return 2 * (xy - torch.tensor([0.5, 0.25], dtype=torch.float64))


@dataclass(frozen=True, repr=False)
class SwissRoll(CurveDistribution):
    """The spiral (v cos v, v sin v)/5, v = 1.5π(1 + 2u), u uniform on [0, 1], ⊛ N(0, w² I)."""

    name: ClassVar[str] = "swissroll"
    w: float = 0.2

    @property
    def bounds(self) -> Bounds:
        r = 4.5 * math.pi / 5 + max(1.0, 6 * self.w)
        return ((-r, r), (-r, r))

    @property
    def piece_masses(self) -> tuple[float, ...]:
        return (1.0,)

    def curve(self, k: int, u: torch.Tensor) -> torch.Tensor:
        v = 1.5 * math.pi * (1 + 2 * u)
        return torch.stack([v * torch.cos(v), v * torch.sin(v)], dim=-1) / 5


@dataclass(frozen=True, repr=False)
class Pinwheel(CurveDistribution):
    r"""5 spiral arms 2 rho (cos φ_k, sin φ_k), φ_k = 2πk/5 + e^rho/4, mass 1/5 each, ⊛ N(0, w² I).

    rho ~ N(1, 0.3²) truncated to [0.1, 1.9] (±3 sd), parametrised as rho = 0.1 + 1.8 u. This is
    FFJORD's pinwheel with its tangential spread (0.2 after scaling) replaced by isotropic smoothing.
    """

    name: ClassVar[str] = "pinwheel"
    w: float = 0.2
    n_arms: ClassVar[int] = 5
    rho_mean: ClassVar[float] = 1.0
    rho_std: ClassVar[float] = 0.3
    rho_lo: ClassVar[float] = 0.1
    rho_hi: ClassVar[float] = 1.9

    @property
    def bounds(self) -> Bounds:
        r = 2 * self.rho_hi + max(1.0, 6 * self.w)
        return ((-r, r), (-r, r))

    @property
    def piece_masses(self) -> tuple[float, ...]:
        return (1 / self.n_arms,) * self.n_arms

    def curve(self, k: int, u: torch.Tensor) -> torch.Tensor:
        rho = self.rho_lo + (self.rho_hi - self.rho_lo) * u
        phi = 2 * math.pi * k / self.n_arms + 0.25 * torch.exp(rho)
        return 2 * rho[:, None] * torch.stack([torch.cos(phi), torch.sin(phi)], dim=-1)

    def _cdf_range(self) -> tuple[float, float]:
        z = torch.tensor([self.rho_lo, self.rho_hi], dtype=torch.float64)
        c = torch.special.ndtr((z - self.rho_mean) / self.rho_std)
        return float(c[0]), float(c[1])

    def sample_parameter(self, k: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
        c_lo, c_hi = self._cdf_range()
        v = c_lo + (c_hi - c_lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        rho = self.rho_mean + self.rho_std * torch.special.ndtri(v)
        return ((rho - self.rho_lo) / (self.rho_hi - self.rho_lo)).clamp(0, 1)

    def log_parameter_density(self, k: int, u: torch.Tensor) -> torch.Tensor:
        c_lo, c_hi = self._cdf_range()
        span = self.rho_hi - self.rho_lo
        z = (self.rho_lo + span * u - self.rho_mean) / self.rho_std
        return _log_phi(z) - math.log(self.rho_std) - math.log(c_hi - c_lo) + math.log(span)


# ---------------------------------------------------------------------------------------- factory
TOY_NAMES: tuple[str, ...] = (
    "checkerboard",
    "8gaussians",
    "gmm",
    "rings",
    "moons",
    "swissroll",
    "pinwheel",
    "imbalanced",
)


def toy_distribution(name: str, **params) -> ToyDistribution:
    """The toy distribution called ``name`` (one of ``TOY_NAMES``), built with the keyword ``params``
    of its class (e.g. ``w=0.1`` for the smoothed sets, ``gaussian_mixture=...`` for ``gmm``)."""
    cls: type[ToyDistribution]
    match name:
        case "checkerboard":
            cls = Checkerboard
        case "8gaussians":
            cls = EightGaussians
        case "gmm":
            cls = GMM
        case "rings":
            cls = Rings
        case "moons":
            cls = Moons
        case "swissroll":
            cls = SwissRoll
        case "pinwheel":
            cls = Pinwheel
        case "imbalanced":
            cls = Imbalanced
        case _:
            raise ValueError(f"name must be one of {', '.join(TOY_NAMES)}; got {name!r}")
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"bad parameters {sorted(params)} for toy distribution {name!r}: {e}") from None
