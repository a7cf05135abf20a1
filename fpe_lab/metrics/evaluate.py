r"""Evaluation of a learned score against the truth (issue 4, item 4): one call, one JSON-able dict.

For a score s_θ(x, t) trained under a forward SDE on data p_0, with a :class:`~fpe_lab.metrics.truth.Truth`
for the true p_t, :func:`evaluate` measures at each t of a fixed time grid, on x_t = alpha(t) x_0 + sigma(t) z
with fresh (held-out) x_0 ~ p_0 and z ~ N(0, I):

* score-FPE residual  E‖R_θ‖²,  R_θ = ∂_t s_θ − ∇[½g² ∇·s_θ + ½g² ‖s_θ‖² − ⟨f, s_θ⟩ − ∇·f]
  (:func:`fpe_lab.fpe.score_fpe_terms`, exact derivatives), and relative to the size of its terms
  E‖R_θ‖² / E[‖∂_t s‖² + ‖½g²∇∇·s‖² + ‖½g²∇‖s‖²‖² + ‖∇⟨f,s⟩‖²];
* score error  E‖s_θ − ∇log p_t‖²  and relative  E‖s_θ − ∇log p_t‖² / E‖∇log p_t‖²;
* conservativity  E‖J − Jᵀ‖²_F / E‖J‖²_F  (J = ∂s_θ/∂x) and, for D = 2, E|∂_x s_y − ∂_y s_x|;

and once:

* NLL of held-out x_0 under the model's probability-flow ODE (:func:`fpe_lab.likelihood.pf_ode_nll`,
  exact divergence) next to the true −log p_eps of the same points;
* sample quality: reverse-SDE (Euler–Maruyama) and PF-ODE samples from the prior against held-out
  data, by sliced Wasserstein-2 and MMD², the ODE–SDE gap, and the noise floor of each distance
  (two independent held-out sets of the same size).

All verification arithmetic is float64; ``dtype`` is only the dtype handed to ``score_fn``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from fpe_lab.fpe import ScoreFn, jacobian, score_fpe_terms
from fpe_lab.likelihood import bits_per_dim, pf_ode_nll
from fpe_lab.metrics.sample_distance import GaussianKernel, mmd2, noise_floor, sliced_wasserstein
from fpe_lab.metrics.truth import Truth
from fpe_lab.sampling import ODEMethod, pf_ode_sample, reverse_sde_sample
from fpe_lab.sde import LinearSDE
from fpe_lab.shapes import append_dims

__all__ = ["evaluate", "DEFAULT_TIMES", "PER_TIME_METRICS"]

log = logging.getLogger(__name__)

DEFAULT_TIMES: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

PER_TIME_METRICS: tuple[str, ...] = (
    "fpe_residual",
    "fpe_residual_rel",
    "fpe_term_scale",
    "score_error",
    "score_error_rel",
    "true_score_sq_norm",
    "jacobian_asymmetry_rel",
    "curl_abs",
)


def _check_int(v, name: str, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise FloatingPointError(f"evaluate: {what} is non-finite ({value}); the score is unusable there")
    return float(value)


def _mean_sq(v: torch.Tensor) -> torch.Tensor:
    """E‖v‖² over the batch of v (b, *dims), float64."""
    return v.to(torch.float64).reshape(v.shape[0], -1).pow(2).sum(-1).mean()


def _per_time(score_fn: ScoreFn, sde: LinearSDE, truth: Truth, x: torch.Tensor, t: float,
              dtype: torch.dtype) -> dict[str, float]:
    xd = x.to(dtype)
    # a full (b,) time tensor: fpe's scalar-t path expands t, which forward-mode AD rejects
    tb = torch.full((x.shape[0],), t, dtype=dtype)
    terms = score_fpe_terms(score_fn, sde, xd, tb)
    res = _mean_sq(terms.residual)
    scale = terms.scale.to(torch.float64).pow(2).mean()
    s_true = truth.score(x, t)
    err = _mean_sq(terms.s.to(torch.float64) - s_true)
    true_sq = _mean_sq(s_true)
    jac = jacobian(score_fn, xd, tb).to(torch.float64)
    asym = torch.linalg.matrix_norm(jac - jac.transpose(-1, -2)).pow(2).mean()
    out = {
        "fpe_residual": res,
        "fpe_residual_rel": res / scale,
        "fpe_term_scale": scale,
        "score_error": err,
        "score_error_rel": err / true_sq,
        "true_score_sq_norm": true_sq,
        "jacobian_asymmetry_rel": asym / torch.linalg.matrix_norm(jac).pow(2).mean(),
        "curl_abs": (jac[:, 1, 0] - jac[:, 0, 1]).abs().mean() if x.shape[1] == 2 else None,
    }
    return {k: (None if v is None else _finite(float(v), f"{k} at t={t:g}")) for k, v in out.items()}


def _sem(v: torch.Tensor) -> float:
    return float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else 0.0


def evaluate(
    score_fn: ScoreFn,
    sde: LinearSDE,
    data: Any,
    truth: Truth,
    *,
    times: Sequence[float] = DEFAULT_TIMES,
    n_points: int = 1000,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    n_nll: int = 500,
    nll_rtol: float = 1e-5,
    nll_atol: float = 1e-5,
    ode_method: ODEMethod = ODEMethod.RK45,
    n_samples: int = 1000,
    sde_steps: int = 300,
    sample_rtol: float = 1e-4,
    sample_atol: float = 1e-4,
    n_projections: int = 256,
    kernel: GaussianKernel = GaussianKernel(),
    floor_repeats: int = 3,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> dict:
    """Evaluate ``score_fn`` against ``truth``; returns a JSON-serialisable dict (floats, lists, str).

    Main arguments:
        score_fn: s_θ(x, t), x of shape (b, D), t of shape (b,), in eval mode (no train-mode
            BatchNorm/dropout); it receives tensors of ``dtype``.
        sde: the forward SDE the model was trained with (gives alpha, sigma, f, g, the prior).
        data: the data law, ``data.sample(n, generator) -> (n, D)`` (a toy distribution or a
            GaussianMixture); every point used here is drawn fresh from ``generator`` (held out).
        truth: the true p_t of ``data`` under ``sde`` (:mod:`fpe_lab.metrics.truth`).

    Other arguments:
        times: the fixed time grid for the per-time metrics, each in [eps, 1].
        n_points: points x_t per time.
        eps: start of the NLL integration and end of sampling.
        generator: the one source of randomness (fix its seed for reproducible metrics).
        n_nll, nll_rtol, nll_atol, ode_method: the PF-ODE NLL (0 disables the NLL section).
        n_samples, sde_steps, sample_rtol, sample_atol: the sample-quality section (0 disables it);
            Euler–Maruyama with 300 steps and RK45 at 1e-4 by default: their errors (measured with the
            exact mixture score) sit below the noise floor of 1,000 samples, and they keep the
            evaluation within ~40 s on 2 CPU cores.
        n_projections, kernel, floor_repeats: sliced Wasserstein, MMD kernel, noise-floor repeats.
        dtype: dtype passed to score_fn (float64 for verification; float32 for a float32 network).
        progress: tqdm bar over the stages (and nested bars for the ODE solves and the SDE steps).

    Returns (all numbers are Python floats/ints; nothing is NaN — a non-finite metric raises
    ``FloatingPointError`` naming it):
        "times": [t_1, …, t_n];
        "per_time": {metric: [value at t_1, …, value at t_n]} for the metrics
            "fpe_residual"            E‖R_θ‖²,
            "fpe_residual_rel"        E‖R_θ‖² / fpe_term_scale,
            "fpe_term_scale"          E[‖∂_t s‖² + ‖½g²∇∇·s‖² + ‖½g²∇‖s‖²‖² + ‖∇⟨f,s⟩‖²] of s_θ,
            "score_error"             E‖s_θ − ∇log p_t‖²,
            "score_error_rel"         score_error / true_score_sq_norm,
            "true_score_sq_norm"      E‖∇log p_t‖²,
            "jacobian_asymmetry_rel"  E‖J − Jᵀ‖²_F / E‖J‖²_F,
            "curl_abs"                E|∂_x s_y − ∂_y s_x| (only when D = 2, else absent);
            every E over x_t = alpha x_0 + sigma z, n_points fresh draws per t;
        "mean": {metric: average over the time grid of per_time[metric]};
        "nll": {"n_points", "eps", "method", "rtol", "atol", "nfe", "divergence",
                "model_nats", "model_nats_sem", "model_bits_per_dim",
                "true_nats", "true_nats_sem", "true_bits_per_dim",
                "gap_nats", "gap_nats_sem"}
            model = mean −log p_eps(x_0) by the model's PF-ODE (prior = sde's prior),
            true = mean −log p_eps(x_0) of the truth, gap = mean of the per-point difference
            model − true; bits/dim = nats/(D ln 2); sem = standard error of the mean. {} if n_nll = 0;
        "samples": {"n", "eps", "sde_steps", "ode_method", "ode_rtol", "ode_atol", "ode_nfe",
                    "sliced_wasserstein": {"sde_vs_data", "ode_vs_data", "ode_vs_sde", "floor", "floor_std"},
                    "mmd2": {same keys}}
            distances of n reverse-SDE / PF-ODE samples (both ending at t = eps) to n held-out data
            points, and between each other; "floor": mean distance of two independent held-out sets
            of size n (what an exact sampler scores), "floor_std" its spread over floor_repeats.
            {} if n_samples = 0;
        "settings": {"n_points", "eps", "dim", "sde", "truth", "dtype", "n_projections",
                     "kernel_bandwidths", "floor_repeats"}.
    """
    times = [float(t) for t in times]
    if not times:
        raise ValueError("times must be a nonempty sequence of times in [eps, 1]; got []")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1); got {eps!r}")
    bad = [t for t in times if not (math.isfinite(t) and eps <= t <= 1)]
    if bad:
        raise ValueError(f"times must lie in [eps, 1] = [{eps}, 1]; got {bad}")
    _check_int(n_points, "n_points", 2)
    _check_int(n_nll, "n_nll", 0)
    _check_int(n_samples, "n_samples", 0)
    if n_samples == 1:
        raise ValueError("n_samples must be 0 (disabled) or >= 2; got 1")
    _check_int(sde_steps, "sde_steps", 1)
    _check_int(floor_repeats, "floor_repeats", 1)
    if not callable(getattr(data, "sample", None)):
        raise ValueError(f"data must provide sample(n, generator) -> (n, D); got {data!r}")
    if not isinstance(truth, Truth):
        raise ValueError(f"truth must be a fpe_lab.metrics.truth.Truth; got {truth!r}")

    def draw(n: int, gen: torch.Generator | None = generator) -> torch.Tensor:
        x0 = torch.as_tensor(data.sample(n, gen), dtype=torch.float64)
        if x0.ndim != 2 or x0.shape[0] != n:
            raise ValueError(f"data.sample({n}) must return shape ({n}, D); got {tuple(x0.shape)}")
        return x0

    stages = len(times) + (n_nll > 0) + 3 * (n_samples > 0)
    bar = tqdm(total=stages, desc="evaluate", disable=not progress, leave=False)
    dim = None

    per_time: dict[str, list[float]] = {}
    for t in times:
        bar.set_postfix_str(f"per-time t={t:g}")
        x0 = draw(n_points)
        dim = x0.shape[1]
        alpha, sigma = sde.marginal(torch.tensor(t, dtype=torch.float64))
        z = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        xt = append_dims(alpha, 2) * x0 + append_dims(sigma, 2) * z
        for k, v in _per_time(score_fn, sde, truth, xt, t, dtype).items():
            if v is not None:
                per_time.setdefault(k, []).append(v)
        bar.update()
    mean = {k: float(sum(v) / len(v)) for k, v in per_time.items()}

    nll: dict[str, Any] = {}
    if n_nll:
        bar.set_postfix_str("PF-ODE NLL")
        x0 = draw(n_nll)
        res = pf_ode_nll(score_fn, sde, x0.to(dtype), eps=eps, method=ode_method, rtol=nll_rtol, atol=nll_atol,
                         progress=progress)
        model = res.nats.to(torch.float64)
        true = -truth.log_prob(x0, eps)
        gap = model - true
        nll = {
            "n_points": n_nll, "eps": eps, "method": ode_method.value, "rtol": nll_rtol, "atol": nll_atol,
            "nfe": res.nfe, "divergence": res.settings["divergence"],
            "model_nats": _finite(float(model.mean()), "model NLL"), "model_nats_sem": _sem(model),
            "model_bits_per_dim": float(bits_per_dim(model, dim).mean()),
            "true_nats": _finite(float(true.mean()), "true NLL"), "true_nats_sem": _sem(true),
            "true_bits_per_dim": float(bits_per_dim(true, dim).mean()),
            "gap_nats": float(gap.mean()), "gap_nats_sem": _sem(gap),
        }
        bar.update()

    samples: dict[str, Any] = {}
    if n_samples:
        # one projection seed for every sliced-Wasserstein call, so the distances are comparable
        proj_seed = int(torch.randint(2**62, (1,), generator=generator))

        def sw(a: torch.Tensor, b: torch.Tensor) -> float:
            return sliced_wasserstein(a, b, n_projections=n_projections,
                                      generator=torch.Generator().manual_seed(proj_seed))

        def mmd(a: torch.Tensor, b: torch.Tensor) -> float:
            return mmd2(a, b, kernel=kernel)

        bar.set_postfix_str("reverse-SDE samples")
        x_T = sde.prior_sample((n_samples, dim), generator=generator, dtype=dtype)
        x_sde = reverse_sde_sample(score_fn, sde, x_T, n_steps=sde_steps, eps=eps, generator=generator,
                                   progress=progress)
        bar.update()
        bar.set_postfix_str("PF-ODE samples")
        ode = pf_ode_sample(score_fn, sde, x_T, eps=eps, method=ode_method, rtol=sample_rtol, atol=sample_atol,
                            progress=progress)
        bar.update()
        bar.set_postfix_str("sample distances")
        held_out = draw(n_samples)
        x_sde, x_ode = x_sde.to(torch.float64), ode.x.to(torch.float64)
        floor_gen = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        floor_draw = lambda n, g: draw(n, g)  # noqa: E731
        samples = {
            "n": n_samples, "eps": eps, "sde_steps": sde_steps, "ode_method": ode_method.value,
            "ode_rtol": sample_rtol, "ode_atol": sample_atol, "ode_nfe": ode.nfe,
        }
        for name, dist in (("sliced_wasserstein", sw), ("mmd2", mmd)):
            floor = noise_floor(floor_draw, n_samples, dist, repeats=floor_repeats, generator=floor_gen)
            samples[name] = {
                "sde_vs_data": _finite(dist(x_sde, held_out), f"{name} sde_vs_data"),
                "ode_vs_data": _finite(dist(x_ode, held_out), f"{name} ode_vs_data"),
                "ode_vs_sde": _finite(dist(x_ode, x_sde), f"{name} ode_vs_sde"),
                "floor": floor.mean,
                "floor_std": floor.std,
            }
        bar.update()
    bar.close()

    settings = {
        "n_points": n_points, "eps": eps, "dim": dim, "sde": str(sde), "truth": repr(truth),
        "dtype": str(dtype).removeprefix("torch."), "n_projections": n_projections,
        "kernel_bandwidths": list(kernel.bandwidths), "floor_repeats": floor_repeats,
    }
    log.info("evaluate: mean fpe_residual_rel %.3g, score_error_rel %.3g, NLL gap %s",
             mean["fpe_residual_rel"], mean["score_error_rel"], nll.get("gap_nats"))
    return {"times": times, "per_time": per_time, "mean": mean, "nll": nll, "samples": samples,
            "settings": settings}
