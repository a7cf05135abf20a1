r"""Evaluation of a learned score, for points and images alike: one call, one typed report.

For a score s_θ(x, t) trained under a forward SDE, :func:`evaluate` measures at each t of a time grid,
on x_t = alpha(t) x_0 + sigma(t) z with held-out x_0 and fresh z ~ N(0, I):

* the score-FPE residual  E‖R_θ‖²,  R_θ = ∂_t s_θ − ∇[½g² ∇·s_θ + ½g² ‖s_θ‖² − ⟨f, s_θ⟩ − ∇·f],
  with its standard error, and relative to the size of its terms
  E‖R_θ‖² / E[‖∂_t s‖² + ‖½g²∇∇·s‖² + ‖½g²∇‖s‖²‖² + ‖∇⟨f,s⟩‖²]. The divergence is exact for
  D ≤ :data:`EXACT_MAX_DIM`; above, Hutchinson probes and unbiased estimates of both the residual and
  the term scale (two independent probe sets: :mod:`fpe_lab.metrics.per_time`, shared with the audit);
* the Jacobian asymmetry E‖J − Jᵀ‖²_F / E‖J‖²_F (J = ∂s_θ/∂x; exact, or unbiased Hutchinson
  estimates of both means) with a delta-method standard error, and for D = 2 E|∂_x s_y − ∂_y s_x|;
* the DSM loss E‖sigma s_θ(x_t, t) + z‖² at that t (the fit, to read the residual against);
* where a truth is given: the score error E‖s_θ − ∇log p_t‖² and relative to E‖∇log p_t‖²;

and once:

* the NLL of held-out x_0 under the model's probability-flow ODE (:func:`fpe_lab.likelihood.pf_ode_nll`;
  bits/dim with dequantization for images), next to the true −log p_eps where the truth is known,
  and for images the DSM variational bound as a cheap check;
* sample quality (points): reverse-SDE and PF-ODE samples against held-out data, by sliced
  Wasserstein-2 and MMD², with the noise floor of each distance.

Per-time work is done in chunks of ``batch_size`` points. The report is an :class:`EvalReport`; its
``to_dict`` is the one ``metrics.json`` schema of every run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fpe_lab.checks import check_int
from fpe_lab.fpe import Estimate, Hutchinson, Probe, ScoreFn
from fpe_lab.likelihood import UniformDequantization, dsm_nll_bound, pf_ode_nll
from fpe_lab.metrics.gap import GapReport, ode_sde_gap
from fpe_lab.metrics.per_time import per_time_samples
from fpe_lab.metrics.sample_distance import GaussianKernel, mmd2, noise_floor, sliced_wasserstein
from fpe_lab.metrics.truth import Truth
from fpe_lab.progress import progress_bar as tqdm
from fpe_lab.sampling import ODEMethod, pf_ode_sample, reverse_sde_sample
from fpe_lab.sde import LinearSDE

__all__ = ["evaluate", "EvalReport", "PerTime", "Likelihood", "Distances", "Samples", "DEFAULT_TIMES",
           "EXACT_MAX_DIM"]

log = logging.getLogger(__name__)

DEFAULT_TIMES: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
EXACT_MAX_DIM = 16
"""Largest D with exact divergences and Jacobians in the evaluation (D reverse passes each)."""


# ---------------------------------------------------------------------- the report
def _floats(v: Any) -> Any:
    """A JSON list as a tuple of floats (None stays None)."""
    return None if v is None else tuple(float(x) for x in v)


@dataclass(frozen=True)
class PerTime:
    """Per-time metrics; each a tuple with one value per evaluation time (None where not measured)."""

    fpe_residual: tuple[float, ...]
    fpe_residual_se: tuple[float, ...]
    fpe_residual_rel: tuple[float, ...]
    fpe_term_scale: tuple[float, ...]
    jacobian_asymmetry_rel: tuple[float, ...]
    jacobian_asymmetry_rel_se: tuple[float, ...]
    dsm: tuple[float, ...]
    dsm_se: tuple[float, ...]
    score_error: tuple[float, ...] | None = None
    score_error_rel: tuple[float, ...] | None = None
    true_score_sq_norm: tuple[float, ...] | None = None
    curl_abs: tuple[float, ...] | None = None

    def metrics(self) -> dict[str, tuple[float, ...]]:
        """The metrics that were measured, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Likelihood:
    """−log p_eps of held-out points by the PF-ODE (nats and bits/dim), and the truth's where known."""

    n_points: int
    repeats: int
    eps: float
    method: str
    rtol: float
    nfe: int
    divergence: str
    model_nats: float
    model_nats_sem: float
    model_bits_per_dim: float
    model_bits_per_dim_per_repeat: tuple[float, ...]
    true_nats: float | None = None
    true_nats_sem: float | None = None
    gap_nats: float | None = None
    gap_nats_sem: float | None = None
    dsm_bound_bits_per_dim: float | None = None
    dsm_bound_sem: float | None = None


@dataclass(frozen=True)
class Distances:
    sde_vs_data: float
    ode_vs_data: float
    ode_vs_sde: float
    floor: float
    floor_std: float


@dataclass(frozen=True)
class Samples:
    """Distances of reverse-SDE and PF-ODE samples to held-out data; ``floor``: two exact sample sets."""

    n: int
    sde_steps: int
    ode_nfe: int
    sliced_wasserstein: Distances
    mmd2: Distances


@dataclass(frozen=True)
class EvalReport:
    """What :func:`evaluate` measured. ``step``: the training step of the weights evaluated."""

    times: tuple[float, ...]
    per_time: PerTime
    dim: int
    step: int | None = None
    nll: Likelihood | None = None
    samples: Samples | None = None
    settings: dict = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0
    gap: GapReport | None = None
    # the gridded densities behind ``gap`` (figures only; not part of metrics.json)
    gap_densities: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def mean(self) -> dict[str, float]:
        """Each per-time metric averaged over the time grid."""
        return {k: sum(v) / len(v) for k, v in self.per_time.metrics().items()}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(dataclasses.replace(self, gap_densities=None))
        del d["gap_densities"]
        if d["gap"] is None:
            del d["gap"]  # metrics.json of a run evaluated without --eval-gap-grid keeps its 0.2 keys
        d["mean"] = self.mean
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        """Inverse of :meth:`to_dict`; ValueError naming what is missing or malformed."""
        try:
            per_time = PerTime(**{k: _floats(v) for k, v in d["per_time"].items()})
            nll = d.get("nll")
            samples = d.get("samples")
            if nll is not None:
                per_repeat = tuple(nll["model_bits_per_dim_per_repeat"])
                nll = Likelihood(**{**nll, "model_bits_per_dim_per_repeat": per_repeat})
            if samples is not None:
                samples = Samples(**{**samples, "sliced_wasserstein": Distances(**samples["sliced_wasserstein"]),
                                     "mmd2": Distances(**samples["mmd2"])})
            report = cls(times=_floats(d["times"]), per_time=per_time, dim=int(d["dim"]), step=d.get("step"),
                         nll=nll, samples=samples, settings=dict(d.get("settings", {})),
                         wall_s=float(d.get("wall_s", 0.0)),
                         gap=GapReport.from_dict(d["gap"]) if d.get("gap") is not None else None)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not an evaluation report: {type(e).__name__}: {e}") from None
        n = len(report.times)
        bad = [k for k, v in per_time.metrics().items()
               if len(v) != n or not all(math.isfinite(x) for x in v)]
        if bad:
            raise ValueError(f"not an evaluation report: per_time {bad} must hold {n} finite numbers")
        return report


# ---------------------------------------------------------------------- helpers
def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"evaluate: {what} is non-finite ({value}); the score is unusable there")
    return float(value)


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    est = Estimate(v)
    return est.mean, est.se


def _per_time(score_fn: ScoreFn, sde: LinearSDE, truth: Truth | None, x0: torch.Tensor, t: float,
              dtype: torch.dtype, generator: torch.Generator, probes: int, batch_size: int) -> dict[str, Any]:
    """The per-sample quantities at time t (:func:`fpe_lab.metrics.per_time.per_time_samples`), reduced to
    means and standard errors; the relative residual divides by the unbiased term scale."""
    samples = per_time_samples(score_fn, sde, x0, t, exact=x0[0].numel() <= EXACT_MAX_DIM, probes=probes,
                               batch_size=batch_size, generator=generator, dtype=dtype, truth=truth)
    for k, v in samples.items():
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError(f"evaluate: {k} at t={t:g} is non-finite; the score is unusable there")
    cat = {k: Estimate(v) for k, v in samples.items()}
    out: dict[str, Any] = {}
    out["fpe_residual"], out["fpe_residual_se"] = cat["res"].mean, cat["res"].se
    out["fpe_term_scale"] = cat["scale"].mean
    out["fpe_residual_rel"] = cat["res"].ratio(cat["scale"])[0]
    out["jacobian_asymmetry_rel"], out["jacobian_asymmetry_rel_se"] = cat["asym"].ratio(cat["jsq"])
    out["dsm"], out["dsm_se"] = cat["dsm"].mean, cat["dsm"].se
    if "err" in cat:
        out["score_error"] = cat["err"].mean
        out["true_score_sq_norm"] = cat["true_sq"].mean
        out["score_error_rel"] = cat["err"].ratio(cat["true_sq"])[0]
    if "curl" in cat:
        out["curl_abs"] = cat["curl"].mean
    return {k: _finite(v, f"{k} at t={t:g}") for k, v in out.items()}


# ---------------------------------------------------------------------- evaluate
def evaluate(
    score_fn: ScoreFn,
    sde: LinearSDE,
    data: Any,
    truth: Truth | None = None,
    *,
    times: Sequence[float] = DEFAULT_TIMES,
    n_points: int = 1000,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    n_nll: int = 500,
    nll_rtol: float = 1e-5,
    nll_repeats: int = 1,
    dequantization: UniformDequantization | None = None,
    ode_method: ODEMethod = ODEMethod.RK45,
    n_samples: int = 1000,
    sde_steps: int = 300,
    sample_rtol: float = 1e-4,
    n_projections: int = 256,
    kernel: GaussianKernel = GaussianKernel(),
    floor_repeats: int = 3,
    probes: int = 2,
    batch_size: int = 4096,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    step: int | None = None,
    progress: bool = True,
    gap_grid: int = 0,
) -> EvalReport:
    """Evaluate ``score_fn``; returns an :class:`EvalReport` (nothing NaN: a non-finite metric raises
    ``FloatingPointError`` naming it).

    Main arguments:
        score_fn: s_θ(x, t), x of shape (b, *dims), t of shape (b,), in eval mode (no train-mode
            BatchNorm/dropout); it receives tensors of ``dtype`` on ``device``.
        sde: the forward SDE the model was trained with (alpha, sigma, f, g, the prior).
        data: held-out data, ``data.sample(n, generator) -> (n, *dims)`` (a toy distribution, a
            GaussianMixture, or an image test set).
        truth: the true p_t of ``data`` (:mod:`fpe_lab.metrics.truth`), or None (images): then no
            score error and no true NLL.

    Other arguments:
        times: the time grid of the per-time metrics, each in [eps, 1].
        n_points: points x_t per time.
        eps: start of the NLL integration and end of sampling.
        generator: the one source of randomness (fix its seed for reproducible metrics; CPU).
        n_nll, nll_rtol, nll_repeats, dequantization, ode_method: the PF-ODE NLL (0 points skips it);
            rtol = atol; each repeat redraws dequantization noise and Hutchinson probes (frozen per
            solve); with ``dequantization`` the NLL is of the dequantized data, in bits/dim, and the DSM
            bound is reported beside it.
        n_samples, sde_steps, sample_rtol: sample quality (0 skips it).
        n_projections, kernel, floor_repeats: sliced Wasserstein, MMD kernel, noise-floor repeats.
        probes: Hutchinson probes per point where D > EXACT_MAX_DIM.
        batch_size: points per chunk.
        dtype, device: what ``score_fn`` receives (float64 for verification).
        step: the training step of the weights, recorded in the report.
        progress: tqdm bar over the stages.
        gap_grid: N > 0 adds the ODE–SDE gap on an N × N grid (2-D data with a truth only;
            :mod:`fpe_lab.metrics.gap`), with max(n_nll, 100) held-out points for the SDE model's NLL.
    """
    start = time.perf_counter()
    times = tuple(float(t) for t in times)
    if not times:
        raise ValueError("times must be a nonempty sequence of times in [eps, 1]; got []")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1); got {eps!r}")
    bad = [t for t in times if not (math.isfinite(t) and eps <= t <= 1)]
    if bad:
        raise ValueError(f"times must lie in [eps, 1] = [{eps}, 1]; got {bad}")
    for v, name, lo in ((n_points, "n_points", 2), (n_nll, "n_nll", 0), (n_samples, "n_samples", 0),
                        (sde_steps, "sde_steps", 1), (floor_repeats, "floor_repeats", 1), (probes, "probes", 2),
                        (batch_size, "batch_size", 1), (nll_repeats, "nll_repeats", 1)):
        check_int(name, v, lo)
    if n_samples == 1:
        raise ValueError("n_samples must be 0 (disabled) or >= 2; got 1")
    if not callable(getattr(data, "sample", None)):
        raise ValueError(f"data must provide sample(n, generator) -> (n, *dims); got {data!r}")
    if truth is not None and not isinstance(truth, Truth):
        raise ValueError(f"truth must be None or a fpe_lab.metrics.truth.Truth; got {truth!r}")
    generator = generator or torch.Generator().manual_seed(0)
    device = torch.device(device)

    def draw(n: int, gen: torch.Generator | None = generator) -> torch.Tensor:
        x0 = torch.as_tensor(data.sample(n, gen)).to(torch.float64)
        if x0.ndim < 2 or x0.shape[0] != n:
            raise ValueError(f"data.sample({n}) must return shape ({n}, *dims); got {tuple(x0.shape)}")
        return x0.to(device)

    stages = len(times) + (n_nll > 0) + 3 * (n_samples > 0) + (gap_grid > 0)
    bar = tqdm(total=stages, desc="evaluate", disable=not progress, leave=False)
    per_time: dict[str, list[float]] = {}
    dim = 0
    for t in times:
        bar.set_postfix_str(f"t={t:g}")
        x0 = draw(n_points)
        dim = x0[0].numel()
        for k, v in _per_time(score_fn, sde, truth, x0, t, dtype, generator, probes, batch_size).items():
            per_time.setdefault(k, []).append(v)
        bar.update()

    nll = None
    if n_nll:
        bar.set_postfix_str("PF-ODE NLL")
        nll = _likelihood(score_fn, sde, draw(n_nll), truth, eps, nll_rtol, nll_repeats, dequantization, ode_method,
                          dtype, generator, batch_size, dim, progress)
        bar.update()

    gap, gap_densities = None, None
    if gap_grid:
        if dim != 2 or truth is None:
            raise ValueError(f"gap_grid needs 2-D data with a known truth; got D = {dim}, truth {truth!r}")
        bar.set_postfix_str("ODE–SDE gap")
        gap, dens, p_eps = ode_sde_gap(score_fn, sde, data, truth, n=gap_grid, eps=eps,
                                       nll_points=max(n_nll, 100), generator=generator)
        gap_densities = {"ode": dens.ode, "sde": dens.sde, "truth": p_eps, "box": gap.box}
        bar.update()

    samples = None
    if n_samples:
        proj_seed = int(torch.randint(2**62, (1,), generator=generator))

        def sw(a: torch.Tensor, b: torch.Tensor) -> float:
            return sliced_wasserstein(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), n_projections=n_projections,
                                      generator=torch.Generator().manual_seed(proj_seed))

        def mmd(a: torch.Tensor, b: torch.Tensor) -> float:
            return mmd2(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), kernel=kernel)

        bar.set_postfix_str("reverse-SDE samples")
        shape = (n_samples, *draw(1).shape[1:])
        x_T = sde.prior_sample(shape, generator=generator, dtype=dtype).to(device)
        x_sde = reverse_sde_sample(score_fn, sde, x_T, n_steps=sde_steps, eps=eps, generator=generator,
                                   progress=progress)
        bar.update()
        bar.set_postfix_str("PF-ODE samples")
        ode = pf_ode_sample(score_fn, sde, x_T, eps=eps, method=ode_method, rtol=sample_rtol, atol=sample_rtol,
                            progress=progress)
        bar.update()
        bar.set_postfix_str("sample distances")
        held_out = draw(n_samples).cpu()
        x_sde, x_ode = x_sde.to(torch.float64).cpu(), ode.x.to(torch.float64).cpu()
        floor_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        dists = {}
        for name, dist in (("sliced_wasserstein", sw), ("mmd2", mmd)):
            floor = noise_floor(lambda n, g: draw(n, g).cpu(), n_samples, dist, repeats=floor_repeats,
                                generator=floor_gen)
            dists[name] = Distances(sde_vs_data=_finite(dist(x_sde, held_out), f"{name} sde_vs_data"),
                                    ode_vs_data=_finite(dist(x_ode, held_out), f"{name} ode_vs_data"),
                                    ode_vs_sde=_finite(dist(x_ode, x_sde), f"{name} ode_vs_sde"),
                                    floor=floor.mean, floor_std=floor.std)
        samples = Samples(n=n_samples, sde_steps=sde_steps, ode_nfe=ode.nfe, **dists)
        bar.update()
    bar.close()

    settings = {
        "n_points": n_points, "eps": eps, "sde": str(sde), "truth": repr(truth) if truth is not None else None,
        "dtype": str(dtype).removeprefix("torch."),
        "divergence": "exact" if dim <= EXACT_MAX_DIM else f"hutchinson({probes})",
        "n_projections": n_projections, "kernel_bandwidths": list(kernel.bandwidths), "floor_repeats": floor_repeats,
        "ode_method": ode_method.value, "sample_rtol": sample_rtol,
    }
    report = EvalReport(times=times, per_time=PerTime(**{k: tuple(v) for k, v in per_time.items()}), dim=dim,
                        step=step, nll=nll, samples=samples, settings=settings, wall_s=time.perf_counter() - start,
                        gap=gap, gap_densities=gap_densities)
    log.debug("evaluate: %s", report.mean)
    return report


def _likelihood(score_fn, sde, x0, truth, eps, rtol, repeats, dequantization, method, dtype, generator,
                batch_size, dim, progress=False) -> Likelihood:
    exact = dim <= EXACT_MAX_DIM
    runs, bpd, per_repeat, nfe, div_name = [], [], [], 0, "exact"
    for _ in range(repeats):
        gen = torch.Generator(device=x0.device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        divergence = None if exact else Hutchinson(1, Probe.RADEMACHER, generator=gen)
        res = pf_ode_nll(score_fn, sde, x0.to(dtype), eps=eps, method=method, rtol=rtol, atol=rtol,
                         divergence=divergence, dequantization=dequantization, generator=gen, batch_size=batch_size,
                         progress=progress)
        nats = res.nats.to(torch.float64).cpu()
        runs.append(nats)
        bpd.append(res.bits_per_dim.to(torch.float64).cpu())
        per_repeat.append(float(bpd[-1].mean()))
        nfe += res.nfe
        div_name = res.settings["divergence"]
    model = torch.cat(runs)
    mean, sem = _mean_se(model)
    out: dict[str, Any] = dict(
        n_points=x0.shape[0], repeats=repeats, eps=eps, method=method.value, rtol=rtol, nfe=nfe, divergence=div_name,
        model_nats=_finite(mean, "model NLL"), model_nats_sem=sem, model_bits_per_dim=float(torch.cat(bpd).mean()),
        model_bits_per_dim_per_repeat=tuple(per_repeat),
    )
    if truth is not None and dequantization is None:
        true = -truth.log_prob(x0.reshape(x0.shape[0], -1).cpu(), eps)
        gap = runs[0] - true
        out["true_nats"], out["true_nats_sem"] = _mean_se(true)
        out["gap_nats"], out["gap_nats_sem"] = _mean_se(gap)
    if dequantization is not None:
        gen = torch.Generator(device=x0.device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        bound = torch.cat([dsm_nll_bound(score_fn, sde, chunk.to(dtype), eps=eps, n_times=16, generator=gen,
                                         dequantization=dequantization).bits_per_dim.to(torch.float64).cpu()
                           for chunk in x0.split(batch_size)])
        out["dsm_bound_bits_per_dim"], out["dsm_bound_sem"] = _mean_se(bound)
    return Likelihood(**out)
