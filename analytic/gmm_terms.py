r"""(c) Closed forms of every score-FPE term for Gaussian mixtures under VE, VP and sub-VP.

p_t(x) = Σ_k w_k N(x; alpha(t) m_k, alpha(t)² S_k + sigma(t)² I) with alpha, sigma from
:mod:`analytic.marginals`. The terms of the score FPE (Lai et al. 2023, Sec. 3)

    ∂_t s,  ∇·s,  ∇(∇·s),  ∇‖s‖²,  ∇⟨f, s⟩,  ∇(∇·f),     s = ∇ log p_t,  f = a(t) x,

are derived by sympy in three small stages, so the expressions stay small for K ≤ 4, D ≤ 3:

1. *log-derivatives* (per D): each term written for an undefined density p(x, t) through its partial
   derivatives (∂^n p / ∂x..., ∂_t p, ∂_t ∂_x p), e.g. ∇·s = Δp/p − ‖∇p‖²/p²;
2. *one component* (per D): c(x) = exp(l − ½ (x − mu)ᵀ P (x − mu)) and its x-derivatives up to
   third order; ∂_t by the chain rule through (mu, P, l) and their time derivatives;
3. *component parameters* (per D): mu = alpha m, P = (alpha² S + sigma² I)⁻¹ (adjugate / det),
   l = log w − ½ log det(alpha² S + sigma² I) − (D/2) log 2π, and their d/dt via (alpha', sigma').

The mixture density is the sum of its components, so the derivatives of p are the sums of the
stage-2 derivatives over k (done numerically, in float64). All component values are divided by one
common per-sample factor exp(max_k exponent) before the log-derivatives are formed: every stage-1
expression is homogeneous of degree 0 in (p and its derivatives), so this changes nothing but
keeps exp() from underflowing far from the modes.

Lambdified functions are cached per D (stages 1-3) and per SDE kind (marginals). Nothing here
imports ``fpe_lab``. Run ``python -m analytic.gmm_terms`` to print the derivation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sympy as sp

from analytic import marginals
from analytic.marginals import Kind

__all__ = [
    "TERM_NAMES",
    "log_derivative_terms",
    "mixture_terms",
    "gaussian_residual_1d",
]

# Names of the returned terms (vectors have shape (b, D), scalars (b,)).
TERM_NAMES = (
    "s",  # ∇ log p
    "dt_s",  # ∂_t s
    "div_s",  # ∇·s
    "grad_div_s",  # ∇(∇·s)
    "grad_sq_norm_s",  # ∇‖s‖²
    "grad_f_dot_s",  # ∇⟨f, s⟩
    "div_f",  # ∇·f
    "grad_div_f",  # ∇(∇·f)
    "log_p",  # log p
    "dt_log_p",  # ∂_t log p
    "residual",  # ∂_t s − ∇[½g² ∇·s + ½g² ‖s‖² − ⟨f, s⟩ − ∇·f]
    "log_residual",  # ∂_t log p − [½g² (∇·s + ‖s‖²) − ⟨f, s⟩ − ∇·f]
)
_VECTOR_TERMS = ("s", "dt_s", "grad_div_s", "grad_sq_norm_s", "grad_f_dot_s", "grad_div_f", "residual")

_a, _g2 = sp.symbols("a g2", real=True)
_t = sp.Symbol("t", real=True)


def _xs(dim: int) -> tuple[sp.Symbol, ...]:
    return sp.symbols(f"x0:{dim}", real=True)


def _key_name(key: tuple[int, ...]) -> str:
    """Symbol name for ∂^key p, key = (order in x_0, ..., order in x_{D-1}, order in t)."""
    return "p_" + "_".join(str(n) for n in key)


# ----------------------------------------------------------------------------- stage 1
@dataclass(frozen=True)
class LogDerivativeTerms:
    """Stage 1: the score-FPE terms of an arbitrary density p in terms of its partial derivatives."""

    dim: int
    terms: dict[str, sp.Expr | list[sp.Expr]]  # in the symbols p_<key>, x_i, a, g2
    keys: tuple[tuple[int, ...], ...]  # the partial derivatives of p they need


@functools.cache
def log_derivative_terms(dim: int) -> LogDerivativeTerms:
    """Every term for p = p(x_0..x_{D-1}, t) undefined, with drift f = a x (a independent of x)."""
    _check_dim(dim)
    x = _xs(dim)
    p = sp.Function("p")(*x, _t)
    log_p = sp.log(p)
    s = [sp.diff(log_p, xi) for xi in x]
    f = [_a * xi for xi in x]
    div_s = sum(sp.diff(s[i], x[i]) for i in range(dim))
    sq_norm = sum(si**2 for si in s)
    f_dot_s = sum(fi * si for fi, si in zip(f, s))
    div_f = sum(sp.diff(f[i], x[i]) for i in range(dim))
    phi = _g2 / 2 * div_s + _g2 / 2 * sq_norm - f_dot_s - div_f
    terms = {
        "s": s,
        "dt_s": [sp.diff(si, _t) for si in s],
        "div_s": div_s,
        "grad_div_s": [sp.diff(div_s, xi) for xi in x],
        "grad_sq_norm_s": [sp.diff(sq_norm, xi) for xi in x],
        "grad_f_dot_s": [sp.diff(f_dot_s, xi) for xi in x],
        "div_f": div_f,
        "grad_div_f": [sp.diff(div_f, xi) for xi in x],
        "dt_log_p": sp.diff(log_p, _t),
        "residual": [sp.diff(si, _t) - sp.diff(phi, xi) for si, xi in zip(s, x)],
        "log_residual": sp.diff(log_p, _t) - phi,
    }
    variables = (*x, _t)
    replace: dict[sp.Expr, sp.Symbol] = {}
    for expr in _flat(terms.values()):
        for d in expr.atoms(sp.Derivative):
            key = tuple(sum(n for v, n in d.variable_count if v == var) for var in variables)
            replace[d] = sp.Symbol(_key_name(key), real=True)
    replace[p] = sp.Symbol(_key_name((0,) * (dim + 1)), real=True)
    terms = {k: ([e.xreplace(replace) for e in v] if isinstance(v, list) else v.xreplace(replace))
             for k, v in terms.items()}
    keys = tuple(sorted({tuple(int(n) for n in sym.name[2:].split("_")) for sym in replace.values()}))
    return LogDerivativeTerms(dim, terms, keys)


def _flat(values) -> list[sp.Expr]:
    out = []
    for v in values:
        out.extend(v if isinstance(v, list) else [v])
    return out


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or not 1 <= dim <= 3:
        raise ValueError(f"dim must be an int in [1, 3] (symbolic mixtures stay small); got {dim!r}")


@functools.cache
def _stage1_fn(dim: int) -> tuple[Callable, tuple[tuple[int, ...], ...], tuple[str, ...]]:
    ld = log_derivative_terms(dim)
    names = tuple(k for k in ld.terms)
    args = [*_xs(dim), _a, _g2, *[sp.Symbol(_key_name(k), real=True) for k in ld.keys]]
    fn = sp.lambdify(args, [ld.terms[n] for n in names], modules="numpy", cse=True)
    return fn, ld.keys, names


# ----------------------------------------------------------------------------- stage 2
def _sym_matrix(prefix: str, dim: int) -> sp.Matrix:
    m = sp.zeros(dim, dim)
    for i in range(dim):
        for j in range(i, dim):
            m[i, j] = m[j, i] = sp.Symbol(f"{prefix}{i}{j}", real=True)
    return m


def _upper(m: sp.Matrix) -> list[sp.Expr]:
    return [m[i, j] for i in range(m.shape[0]) for j in range(i, m.shape[0])]


@functools.cache
def _stage2_fn(dim: int) -> Callable:
    """(x, mu, P, l, mu', P', l') ↦ [exponent, ∂^key c for every stage-1 key] for one component."""
    x = _xs(dim)
    mu = sp.Matrix(sp.symbols(f"mu0:{dim}", real=True))
    prec = _sym_matrix("P", dim)
    ell = sp.Symbol("l", real=True)
    params = [*mu, *_upper(prec), ell]
    dots = [sp.Symbol(f"dot_{q.name}", real=True) for q in params]
    d = sp.Matrix(x) - mu
    exponent = ell - (d.T * prec * d)[0, 0] / 2
    comp = sp.exp(exponent)
    out = [exponent]
    for key in _stage1_fn(dim)[1]:
        *xorders, torder = key
        e = comp
        for xi, n in zip(x, xorders):
            e = sp.diff(e, xi, n) if n else e
        if torder:  # chain rule through the parameters: ∂_t = Σ_q (∂/∂q) q'
            e = sum(sp.diff(e, q) * qd for q, qd in zip(params, dots))
        out.append(e)
    return sp.lambdify([*x, *params, *dots], out, modules="numpy", cse=True)


# ----------------------------------------------------------------------------- stage 3
@functools.cache
def _stage3_fn(dim: int) -> Callable:
    """(alpha, sigma, alpha', sigma', w, m, S) ↦ (mu, P, l, mu', P', l') of one component of p_t."""
    alpha, sigma, alpha_dot, sigma_dot = sp.symbols("alpha sigma alpha_dot sigma_dot", real=True)
    w = sp.Symbol("w", positive=True)
    m = sp.Matrix(sp.symbols(f"m0:{dim}", real=True))
    cov0 = _sym_matrix("S", dim)
    cov = alpha**2 * cov0 + sigma**2 * sp.eye(dim)
    det = cov.det()
    prec = cov.adjugate() / det
    ell = sp.log(w) - sp.log(det) / 2 - sp.Rational(dim, 2) * sp.log(2 * sp.pi)
    values = [*(alpha * m), *_upper(prec), ell]
    dots = [sp.diff(v, alpha) * alpha_dot + sp.diff(v, sigma) * sigma_dot for v in values]
    return sp.lambdify([alpha, sigma, alpha_dot, sigma_dot, w, *m, *_upper(cov0)], values + dots, modules="numpy",
                       cse=True)


# ----------------------------------------------------------------------------- numeric driver
def mixture_terms(
    kind: Kind,
    params: dict[str, float],
    weights,
    means,
    covs,
    x,
    t,
) -> dict[str, np.ndarray]:
    """Every score-FPE term of the exact mixture p_t at (x, t), float64 numpy.

    Args:
        kind, params: the SDE (``params`` as in :func:`analytic.marginals.coefficients`).
        weights (K,), means (K, D), covs (K, D, D): the data mixture p_0 (weights normalised here).
        x: (b, D) points; t: scalar or (b,) times in (0, 1].
    Returns:
        dict over :data:`TERM_NAMES` (+ "g2"): vectors (b, D), scalars (b,).
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean = np.asarray(means, dtype=np.float64)
    cov = np.asarray(covs, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    n_comp, dim = mean.shape
    b = x.shape[0]
    tt = np.broadcast_to(np.asarray(t, dtype=np.float64), (b,))
    co = marginals.coefficients(kind, **params)(tt)
    stage1, keys, names = _stage1_fn(dim)
    stage2, stage3 = _stage2_fn(dim), _stage3_fn(dim)
    iu = np.triu_indices(dim)
    xs = [x[:, i] for i in range(dim)]
    comps = []
    for k in range(n_comp):
        pars = stage3(co["alpha"], co["sigma"], co["alpha_dot"], co["sigma_dot"], w[k], *mean[k], *cov[k][iu])
        pars = [np.broadcast_to(np.asarray(v, dtype=np.float64), (b,)) for v in pars]
        comps.append(pars)
    n_par = len(comps[0]) // 2
    ell_index = n_par - 1
    # Exponents first, to find one common scale per sample (the largest component).
    exps = np.stack([np.asarray(stage2(*xs, *c)[0]) for c in comps])  # (K, b)
    shift = exps.max(axis=0)
    derivs = np.zeros((len(keys), b))
    for c in comps:
        c = list(c)
        c[ell_index] = c[ell_index] - shift
        vals = stage2(*xs, *c)[1:]
        derivs += np.stack([np.broadcast_to(np.asarray(v, dtype=np.float64), (b,)) for v in vals])
    out_list = stage1(*xs, co["a"], co["g2"], *derivs)
    out: dict[str, np.ndarray] = {}
    for name, val in zip(names, out_list):
        if name in _VECTOR_TERMS:
            out[name] = np.stack([np.broadcast_to(np.asarray(v, dtype=np.float64), (b,)) for v in val], axis=-1)
        else:
            out[name] = np.broadcast_to(np.asarray(val, dtype=np.float64), (b,)).copy()
    p_index = keys.index((0,) * (dim + 1))
    out["log_p"] = np.log(derivs[p_index]) + shift
    out["g2"] = np.asarray(co["g2"], dtype=np.float64).copy()
    return out


# ----------------------------------------------------------------------------- symbolic check
def gaussian_residual_1d(kind: Kind) -> sp.Expr:
    """Score-FPE residual of the exact p_t = N(x; alpha m, alpha² c + sigma²) in 1D, simplified.

    alpha(t), sigma(t)², a(t), g(t)² are the explicit functions of t from
    :func:`analytic.marginals.derive`; the result is 0 when the marginals solve the FPE.
    """
    mo = marginals.derive(kind)
    x, m = sp.symbols("x m", real=True)
    c = sp.Symbol("c", positive=True)
    tt = marginals.t
    var = mo.alpha**2 * c + mo.sigma2
    s = -(x - mo.alpha * m) / var
    phi = mo.g2 / 2 * sp.diff(s, x) + mo.g2 / 2 * s**2 - mo.a * x * s - mo.a
    return sp.simplify(sp.diff(s, tt) - sp.diff(phi, x))


def main() -> None:
    print("Stage 1 -- score-FPE terms of any density p(x, t), f = a(t) x, written with p's partials:")
    for dim in (1, 2):
        ld = log_derivative_terms(dim)
        print(f"  D = {dim}: needs ∂p keys (x-orders..., t-order) = {ld.keys}")
        for name in ("s", "div_s", "dt_s", "grad_div_s", "grad_div_f"):
            print(f"    {name:>12} = {ld.terms[name]}")
    print("\nOne Gaussian in 1D, p_t = N(x; alpha m, alpha² c + sigma²), residual simplified:")
    for kind in Kind:
        print(f"  {kind.value:>6}: R = {gaussian_residual_1d(kind)}")
    print("\nNumeric check, K = 3, D = 2, VP, t = 0.3 (residual vs size of ∂_t s):")
    rng = np.random.default_rng(0)
    a_mat = rng.normal(size=(3, 2, 2))
    covs = a_mat @ a_mat.transpose(0, 2, 1) + 0.1 * np.eye(2)
    means = rng.normal(size=(3, 2))
    x = rng.normal(size=(4, 2))
    out = mixture_terms(Kind.VP, {"beta_min": 0.1, "beta_max": 20.0}, [0.2, 0.3, 0.5], means, covs, x, 0.3)
    for name in ("s", "dt_s", "residual"):
        print(f"  {name:>10} = {np.array2string(out[name], precision=4)}")


if __name__ == "__main__":
    main()
