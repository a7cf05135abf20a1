r"""(b) The marginal x_t | x_0 ~ N(alpha(t) x_0, sigma(t)² I) of VE, VP and sub-VP from the moment ODEs.

For a linear SDE dx = a(t) x dt + g(t) dw started at x_0 (no noise at t = 0), the mean m(t) = E[x_t]
and the per-coordinate variance v(t) solve

    dm/dt = a(t) m,            m(0) = x_0        =>  m = alpha(t) x_0,
    dv/dt = 2 a(t) v + g(t)²,  v(0) = 0          =>  v = sigma(t)².

The SDEs are *defined* here by their coefficients only (Score SDE, arXiv 2011.13456, Sec. 3.4 and
App. B); alpha and sigma² are what ``sympy.dsolve`` returns, not formulas copied from ``fpe_lab``:

* VE:     a = 0,  g² = d/dt [sigma_min² exp(2 L t)],  L = ln(sigma_max / sigma_min);
* VP:     a = −½ beta(t),  g² = beta(t);
* sub-VP: a = −½ beta(t),  g² = beta(t) (1 − exp(−2 B(t)));
  beta(t) = beta_min + t (beta_max − beta_min),  B(t) = ∫_0^t beta.

For VP and sub-VP the ODEs are solved in the clock B (dB = beta dt, so d/dt = beta d/dB), where
they have constant coefficients; sympy's integrator fails on the polynomial-in-t form directly.

Run ``python -m analytic.marginals`` to print the derivation.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass

import mpmath
import numpy as np
import sympy as sp

__all__ = ["Kind", "Moments", "derive", "coefficients", "PARAMETERS"]

t = sp.Symbol("t", nonnegative=True)
sigma_min, sigma_max = sp.symbols("sigma_min sigma_max", positive=True)
beta_min, beta_max = sp.symbols("beta_min beta_max", positive=True)
_L = sp.Symbol("L", positive=True)  # ln(sigma_max / sigma_min)
_B = sp.Symbol("B", nonnegative=True)  # B(t) = ∫_0^t beta


class Kind(enum.Enum):
    """The three forward SDEs of Score SDE."""

    VE = "VE"
    VP = "VP"
    SUBVP = "sub-VP"


PARAMETERS: dict[Kind, tuple[sp.Symbol, sp.Symbol]] = {
    Kind.VE: (sigma_min, sigma_max),
    Kind.VP: (beta_min, beta_max),
    Kind.SUBVP: (beta_min, beta_max),
}


@dataclass(frozen=True)
class Moments:
    """Symbolic coefficients (functions of ``t`` and the SDE's parameters) and the solved moments."""

    kind: Kind
    a: sp.Expr  # drift coefficient, f(x, t) = a(t) x
    g2: sp.Expr  # g(t)²
    alpha: sp.Expr  # mean factor, solution of dm/dt = a m, m(0) = 1
    sigma2: sp.Expr  # variance, solution of dv/dt = 2 a v + g², v(0) = 0
    ode_alpha: sp.Eq  # the ODEs as solved (in t for VE, in B for VP / sub-VP)
    ode_sigma2: sp.Eq

    @property
    def params(self) -> tuple[sp.Symbol, sp.Symbol]:
        return PARAMETERS[self.kind]


def _beta() -> tuple[sp.Expr, sp.Expr]:
    u = sp.Symbol("u", nonnegative=True)
    beta = beta_min + t * (beta_max - beta_min)
    return beta, sp.integrate(beta.subs(t, u), (u, 0, t))


@functools.cache
def derive(kind: Kind) -> Moments:
    """Solve the moment ODEs of ``kind`` with ``sympy.dsolve`` (cached; about a second each)."""
    if not isinstance(kind, Kind):
        raise ValueError(f"kind must be an analytic.marginals.Kind ({[k.name for k in Kind]}); got {kind!r}")
    m, v = sp.Function("m"), sp.Function("v")
    match kind:
        case Kind.VE:
            a = sp.Integer(0)
            g2_l = sp.diff((sigma_min * sp.exp(_L * t)) ** 2, t)  # d[sigma_SDE²]/dt, sigma_SDE = sigma_min e^{L t}
            ode_m = sp.Eq(m(t).diff(t), a * m(t))
            ode_v = sp.Eq(v(t).diff(t), 2 * a * v(t) + g2_l)
            alpha = sp.dsolve(ode_m, m(t), ics={m(0): 1}).rhs
            sigma2 = sp.dsolve(ode_v, v(t), ics={v(0): 0}).rhs
            log_ratio = sp.log(sigma_max / sigma_min)
            g2, alpha, sigma2 = (e.subs(_L, log_ratio) for e in (g2_l, alpha, sigma2))
        case Kind.VP | Kind.SUBVP:
            beta, int_beta = _beta()
            a = -beta / 2
            # g² = beta(t)·h(B): in the clock B the ODEs read dm/dB = −m/2, dv/dB = −v + h(B).
            h = sp.Integer(1) if kind is Kind.VP else 1 - sp.exp(-2 * _B)
            g2 = beta * h.subs(_B, int_beta)
            ode_m = sp.Eq(m(_B).diff(_B), sp.simplify(a / beta) * m(_B))
            ode_v = sp.Eq(v(_B).diff(_B), sp.simplify(2 * a / beta) * v(_B) + h)
            alpha = sp.dsolve(ode_m, m(_B), ics={m(0): 1}).rhs.subs(_B, int_beta)
            sigma2 = sp.dsolve(ode_v, v(_B), ics={v(0): 0}).rhs.subs(_B, int_beta)
    return Moments(kind, a, g2, sp.simplify(alpha), sp.simplify(sigma2), ode_m, ode_v)


@functools.cache
def _lambdified(kind: Kind) -> Callable:
    mo = derive(kind)
    sigma = sp.sqrt(mo.sigma2)
    exprs = [mo.alpha, sigma, sp.diff(mo.alpha, t), sp.diff(sigma, t), mo.a, mo.g2]
    # mpmath, not numpy: the solved forms (1 − exp(−B), r^{2t} − 1, (1 − e^{−B})² expanded) cancel
    # catastrophically for small t in float64; 30 digits make them a true float64 reference.
    return [sp.lambdify((t, *mo.params), e, modules="mpmath") for e in exprs]


@functools.cache
def _sigma_dot_at_zero(kind: Kind) -> Callable:
    mo = derive(kind)
    lim = sp.limit(sp.diff(sp.sqrt(mo.sigma2), t), t, 0, "+")
    return sp.lambdify((t, *mo.params), lim, modules="mpmath")


_KEYS = ("alpha", "sigma", "alpha_dot", "sigma_dot", "a", "g2")


def coefficients(kind: Kind, **params: float) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """Numeric t ↦ {alpha, sigma, alpha_dot, sigma_dot, a, g2} (float64 arrays shaped like t).

    ``params``: sigma_min, sigma_max for VE; beta_min, beta_max for VP and sub-VP. Evaluated in
    30-digit mpmath arithmetic and rounded to float64.
    """
    names = [p.name for p in PARAMETERS[kind]]
    if sorted(params) != sorted(names):
        raise ValueError(f"params for {kind.value} must be exactly {names}; got {sorted(params)}")
    fn = _lambdified(kind)

    def at(tt) -> dict[str, np.ndarray]:
        tt = np.asarray(tt, dtype=np.float64)
        flat = tt.reshape(-1)
        out = np.empty((len(_KEYS), flat.size))
        with mpmath.workdps(30):
            values = [mpmath.mpf(float(params[n])) for n in names]
            for j, tj in enumerate(flat):
                tj = mpmath.mpf(float(tj))
                for i, f in enumerate(fn):
                    # sigma'(0) is 0/0 in the formula: use its one-sided limit (inf for VE and VP)
                    f = _sigma_dot_at_zero(kind) if (i == 3 and tj == 0) else f
                    out[i, j] = float(f(tj, *values))
        return {k: o.reshape(tt.shape) for k, o in zip(_KEYS, out)}

    return at


def main() -> None:
    sp.init_printing(use_unicode=True)
    for kind in Kind:
        mo = derive(kind)
        print(f"== {kind.value} ==")
        print("  f(x, t) = a(t) x,  a(t) =", mo.a)
        print("  g(t)²   =", mo.g2)
        print("  mean ODE    :", mo.ode_alpha)
        print("  variance ODE:", mo.ode_sigma2)
        print("  alpha(t)    =", mo.alpha)
        print("  sigma(t)²   =", mo.sigma2)
        check_m = sp.simplify(sp.diff(mo.alpha, t) - mo.a * mo.alpha)
        check_v = sp.simplify(sp.diff(mo.sigma2, t) - 2 * mo.a * mo.sigma2 - mo.g2)
        print(f"  check: d alpha/dt − a alpha = {check_m};  d sigma²/dt − 2a sigma² − g² = {check_v};"
              f"  alpha(0) = {mo.alpha.subs(t, 0)}, sigma²(0) = {sp.simplify(mo.sigma2.subs(t, 0))}")


if __name__ == "__main__":
    main()
