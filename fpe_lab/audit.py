r"""Audit any score model against the score Fokker–Planck equation, per diffusion time.

For a score ``score_fn(x: (b, *dims), t: (b,)) -> (b, *dims)``, a linear SDE with marginal
x_t | x_0 ~ N(alpha(t) x_0, sigma(t)² I) and data x_0 of shape (n, *dims), :func:`audit` measures at each t
of a grid, on x_t = alpha(t) x_0 + sigma(t) z with fresh z ~ N(0, I):

* ``residual``: E‖R‖², R = ∂_t s − ∇[½g² ∇·s + ½g² ‖s‖² − ⟨f, s⟩ − ∇·f] (:mod:`fpe_lab.fpe`). For
  D ≤ ``exact_max_dim`` the divergence is exact and the value is ‖R‖²; above, each point gets two
  residuals R̂₁, R̂₂ whose Hutchinson divergences use independent Rademacher probe sets (``probes``
  each) and the value is ⟨R̂₁, R̂₂⟩, the unbiased estimate of :func:`fpe_lab.fpe.residual_sq` with
  ``ResidualEstimator.UNBIASED`` (‖R̂‖² would add the estimator's variance, which grows with D).
  ``residual_se``: its standard error over the points.
* ``residual_rel`` = E‖R‖² / E[S²], with S² the squared size of the equation's terms
  (:attr:`fpe_lab.fpe.ScoreFPETerms.scale` squared)

      S² = ‖∂_t s‖² + ‖½g² ∇(∇·s)‖² + ‖½g² ∇‖s‖²‖² + ‖∇⟨f, s⟩‖²,

  both expectations over x_t ~ p_t. For a linear SDE ∇(∇·f) = 0, so R is the signed sum of these four
  vectors and ‖R‖² ≤ 4 S² (Cauchy–Schwarz): residual_rel is 0 when the terms cancel and O(1) when
  they are unrelated. With Hutchinson, ‖½g² ∇(∇·s)‖² is estimated like ‖R‖², as
  ⟨½g² ∇(∇̂₁·s), ½g² ∇(∇̂₂·s)⟩ from the same two draws, so E[S²] is unbiased too.
  ``term_scale`` = E[S²]; ``residual_rel_se``: delta-method standard error of the ratio.
* ``asymmetry`` = E‖J − Jᵀ‖²_F / E‖J‖²_F (ratio of means; J = ∂s/∂x on the flattened D coordinates;
  0 for a gradient field, ≤ 4), exact for D ≤ ``exact_max_dim``, else from unbiased Hutchinson estimates
  of both (:func:`fpe_lab.fpe.jacobian_asymmetry_sq`, ``probes`` probes); ``asymmetry_se``: the delta
  method, sqrt(Var(a − r b)/n) / mean(b) for r = mean(a)/mean(b).
* ``dsm`` = E‖sigma(t) s(x_t, t) + z‖², the denoising score-matching loss at that t (D for s = 0,
  minimal for the true score), to read the residual against the fit; ``dsm_se`` its standard error.

Work is done in chunks of ``batch_size`` points (each chunk's derivatives are independent: no
interaction between samples inside ``score_fn``). An ``nn.Module`` score runs in eval mode.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fpe_lab.checks import check_int
from fpe_lab.fpe import Estimate, ScoreFn, eval_mode
from fpe_lab.metrics.per_time import per_time_samples
from fpe_lab.progress import progress_bar as tqdm
from fpe_lab.sde import LinearSDE

__all__ = ["AuditReport", "audit", "default_times", "report_figure", "DEFAULT_EPS", "EXACT_MAX_DIM"]

DEFAULT_EPS = 1e-3
EXACT_MAX_DIM = 16

_SERIES = ("times", "residual", "residual_se", "residual_rel", "residual_rel_se", "term_scale",
           "asymmetry", "asymmetry_se", "dsm", "dsm_se")


_NAMES = {"res": "residual ‖R‖²", "scale": "term size S²", "asym": "‖J − Jᵀ‖²", "jsq": "‖J‖²", "dsm": "DSM loss",
          "curl": "curl"}


def default_times(eps: float = DEFAULT_EPS, n: int = 8) -> tuple[float, ...]:
    """n times log-spaced from eps to 1 (both included)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1); got {eps!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2; got {n!r}")
    return tuple(float(v) for v in torch.logspace(math.log10(eps), 0.0, n, dtype=torch.float64))


@dataclass(frozen=True)
class AuditReport:
    """Per-time audit results (module docstring for each quantity); every series has one value per time.

    ``dim`` = D, ``points`` = number of data points per time, ``probes`` = Hutchinson probes per
    estimate (None: exact divergence and Jacobian), ``sde`` = the SDE's equation.
    """

    times: tuple[float, ...]
    residual: tuple[float, ...]
    residual_se: tuple[float, ...]
    residual_rel: tuple[float, ...]
    residual_rel_se: tuple[float, ...]
    term_scale: tuple[float, ...]
    asymmetry: tuple[float, ...]
    asymmetry_se: tuple[float, ...]
    dsm: tuple[float, ...]
    dsm_se: tuple[float, ...]
    dim: int
    points: int
    probes: int | None
    sde: str

    def __post_init__(self) -> None:
        n = len(self.times)
        if n == 0:
            raise ValueError("times must hold at least one time; got none")
        for name in _SERIES:
            v = getattr(self, name)
            if not isinstance(v, tuple) or len(v) != n:
                got = f"{len(v)} values" if isinstance(v, (tuple, list)) else type(v).__name__
                raise ValueError(f"{name} must be a tuple with one value per time ({n}); got {got}")
            bad = [x for x in v if not (isinstance(x, float) and math.isfinite(x))]
            if bad:
                raise ValueError(f"{name} must hold finite floats; got {bad[0]!r}")
        for name in ("dim", "points"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        if self.probes is not None and (isinstance(self.probes, bool) or not isinstance(self.probes, int)
                                        or self.probes < 1):
            raise ValueError(f"probes must be None (exact) or an int >= 1; got {self.probes!r}")
        if not isinstance(self.sde, str):
            raise ValueError(f"sde must be a string (the SDE's equation); got {type(self.sde).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for the series)."""
        return {f.name: list(getattr(self, f.name)) if f.name in _SERIES else getattr(self, f.name)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditReport:
        """Inverse of :meth:`to_dict`; a missing or unknown key is a ValueError naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"data must be a dict (AuditReport.to_dict()); got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [k for k in names if k not in data]
        unknown = sorted(set(data) - set(names))
        if missing or unknown:
            raise ValueError(f"data must have exactly the keys {names}; missing {missing}, unknown {unknown}")
        kw = {}
        for k in names:
            v = data[k]
            if k in _SERIES:
                if not isinstance(v, (list, tuple)):
                    raise ValueError(f"{k} must be a list of numbers; got {type(v).__name__}")
                v = tuple(float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v)
            kw[k] = v
        return cls(**kw)

    def summary(self) -> str:
        """A one-screen table: one row per time."""
        how = ("exact divergence and Jacobian" if self.probes is None
               else f"Hutchinson, {self.probes} Rademacher probes per estimate")
        lines = [f"score-FPE audit: D = {self.dim}, {self.points} points per time, {how}",
                 f"  {self.sde}",
                 f"{'t':>9} {'E‖R‖²':>22} {'rel to terms':>20} {'asym ‖J−Jᵀ‖²/‖J‖²':>22} {'DSM E‖σs+z‖²':>22}"]
        for i, t in enumerate(self.times):
            lines.append(
                f"{t:9.3g} {_pm(self.residual[i], self.residual_se[i]):>22} "
                f"{_pm(self.residual_rel[i], self.residual_rel_se[i]):>20} "
                f"{_pm(self.asymmetry[i], self.asymmetry_se[i]):>22} {_pm(self.dsm[i], self.dsm_se[i]):>22}"
            )
        return "\n".join(lines)


def _pm(v: float, se: float) -> str:
    return f"{v:.4g} ± {se:.2g}"


# ---------------------------------------------------------------------- estimation
def audit(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x0: torch.Tensor,
    times: Sequence[float] | None = None,
    *,
    eps: float = DEFAULT_EPS,
    probes: int = 2,
    points: int | None = None,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    exact_max_dim: int = EXACT_MAX_DIM,
    progress: bool = False,
) -> AuditReport:
    """Audit ``score_fn`` under ``sde`` on data ``x0`` (module docstring for the quantities).

    Args:
        score_fn: ``score_fn(x: (b, *dims), t: (b,)) -> (b, *dims)``, e.g. a ScoreModel.
        sde: the linear SDE the score belongs to (its marginal perturbs x0).
        x0: data, shape (n, *dims), floating; the audit runs in its dtype and on its device.
        times: times in [eps, 1], strictly increasing; default :func:`default_times` (eps).
        eps: smallest allowed time (sigma(0) = 0 makes the score singular at t = 0).
        probes: Rademacher probes per Hutchinson estimate when D > exact_max_dim.
        points: use the first ``points`` rows of x0 (default: all).
        batch_size: points per chunk.
        generator: draws z and the probes (CPU generator: the same numbers on any device);
            default ``torch.Generator().manual_seed(0)``.
        progress: a tqdm bar over times × points.
    """
    if not isinstance(sde, LinearSDE):
        raise ValueError(f"sde must be a fpe_lab.sde.LinearSDE (VESDE, VPSDE, SubVPSDE); got {type(sde).__name__}")
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.ndim < 2 or x0.shape[0] == 0:
        desc = f"shape {tuple(x0.shape)}, dtype {x0.dtype}" if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a floating tensor of shape (n, *dims) with n >= 1; got {desc}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 must be finite; it holds NaN or inf")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1); got {eps!r}")
    times = default_times(eps) if times is None else tuple(times)
    if not times or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not (eps <= t <= 1) for t in times):
        raise ValueError(f"times must be a non-empty list of numbers in [eps, 1] = [{eps:g}, 1]; got {list(times)}")
    if any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be strictly increasing; got {list(times)}")
    check_int("probes", probes, 1)
    check_int("batch_size", batch_size, 1)
    check_int("exact_max_dim", exact_max_dim, 0)
    n = x0.shape[0]
    if points is None:
        points = n
    if isinstance(points, bool) or not isinstance(points, int) or not (1 <= points <= n):
        raise ValueError(f"points must be an int in [1, {n}] (the rows of x0); got {points!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    x0 = x0[:points]
    dim = x0[0].numel()
    exact = dim <= exact_max_dim
    series: dict[str, list[float]] = {k: [] for k in _SERIES}
    with eval_mode(score_fn), tqdm(total=len(times) * points, desc="audit", unit="pt", disable=not progress) as bar:
        for t in times:
            samples = per_time_samples(score_fn, sde, x0, float(t), exact=exact, probes=probes,
                                       batch_size=batch_size, generator=generator, bar=bar)
            for k, v in samples.items():
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"score_fn gave a non-finite {_NAMES[k]} at t = {t:g}; the audit needs a finite "
                                     "score and finite derivatives")
            cat = {k: Estimate(v) for k, v in samples.items()}
            res, res_se = cat["res"].mean, cat["res"].se
            rel, rel_se = cat["res"].ratio(cat["scale"])
            asym, asym_se = cat["asym"].ratio(cat["jsq"])
            dsm, dsm_se = cat["dsm"].mean, cat["dsm"].se
            for name, value in (("times", float(t)), ("residual", res), ("residual_se", res_se),
                                ("residual_rel", rel), ("residual_rel_se", rel_se), ("term_scale", cat["scale"].mean),
                                ("asymmetry", asym), ("asymmetry_se", asym_se), ("dsm", dsm), ("dsm_se", dsm_se)):
                series[name].append(value)
    return AuditReport(**{k: tuple(v) for k, v in series.items()}, dim=dim, points=points,
                       probes=None if exact else probes, sde=str(sde))


# ---------------------------------------------------------------------- figure
def report_figure(report: AuditReport):
    """A ``matplotlib.figure.Figure`` (no global backend) with every per-t quantity against t (log t):
    E‖R‖² and E[S²] (log y), the relative residual, the asymmetry ratio and the DSM loss (with D, its
    value for s = 0), with ±2 SE bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.4), layout="constrained")
    axes = fig.subplots(1, 4)
    t = list(report.times)

    def band(ax, y, se, label, color=None):
        ax.errorbar(t, y, yerr=[2 * s for s in se], marker="o", ms=3, capsize=2, label=label, color=color)

    ax = axes[0]
    ax.plot(t, report.term_scale, color="0.7", lw=4, zorder=1, label="E[S²] (size of the terms)")
    band(ax, report.residual, report.residual_se, "E‖R‖² (unbiased)")
    if all(v > 0 for v in report.residual) and all(v > 0 for v in report.term_scale):
        ax.set_yscale("log")
    ax.set_title("score-FPE residual")
    ax.legend(fontsize=7)
    band(axes[1], report.residual_rel, report.residual_rel_se, "E‖R‖² / E[S²]")
    axes[1].set_title("residual relative to its terms")
    band(axes[2], report.asymmetry, report.asymmetry_se, "E‖J−Jᵀ‖² / E‖J‖²")
    axes[2].set_title("Jacobian asymmetry")
    band(axes[3], report.dsm, report.dsm_se, "E‖σ s + z‖²")
    axes[3].axhline(report.dim, color="0.5", ls="--", lw=1, label=f"D = {report.dim} (s = 0)")
    axes[3].legend(fontsize=7)
    axes[3].set_title("DSM loss")
    if all(v > 0 for v in report.dsm):
        axes[3].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
    fig.suptitle(f"audit: D = {report.dim}, {report.points} points, "
                 + ("exact" if report.probes is None else f"{report.probes} probes"), fontsize=9)
    return fig
