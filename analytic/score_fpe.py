r"""(a) The score FPE from the density FPE, for general f(x, t) and g(t), in 1D and 2D.

Forward SDE dx = f(x, t) dt + g(t) dw on R^D. The density obeys the Fokker-Planck equation

    ∂_t p = −∇·(f p) + ½ g² Δp.                                                        (FPE)

Write p = exp(u), u = log p, s = ∇u. Dividing (FPE) by p gives the log-density FPE

    ∂_t u = ½ g² (Δu + ‖∇u‖²) − ⟨f, ∇u⟩ − ∇·f,                                         (log-FPE)

and its gradient is the score FPE (Lai et al. 2023, Sec. 3)

    ∂_t s = ∇_x [ ½ g² ∇·s + ½ g² ‖s‖² − ⟨f, s⟩ − ∇·f ].                                (score-FPE)

Here sympy shows, with f_i(x, t), g(t), u(x, t) left as undefined functions:

1. FPE[exp u] / exp u − (∂_t u − RHS_log[u]) simplifies to 0   (so FPE ⇔ log-FPE, as p > 0);
2. R_i[∇u] − ∂_i( FPE[exp u] / exp u ) simplifies to 0, where R is the score-FPE residual
   ∂_t s − ∇[...] evaluated at s = ∇u. Hence FPE ⇒ score-FPE; conversely score-FPE gives
   log-FPE up to an x-independent c(t), which normalisation of p fixes.

Run ``python -m analytic.score_fpe`` to print the derivation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy as sp

__all__ = ["Derivation", "derive"]


@dataclass(frozen=True)
class Derivation:
    dim: int
    fpe_over_p: sp.Expr  # (∂_t p + ∇·(f p) − ½g² Δp) / p at p = exp(u)
    log_fpe: sp.Expr  # ∂_t u − [½g²(Δu + ‖∇u‖²) − ⟨f, ∇u⟩ − ∇·f]
    score_residual: list[sp.Expr]  # R_i at s = ∇u
    log_identity: sp.Expr  # fpe_over_p − log_fpe, simplified (0)
    score_identity: list[sp.Expr]  # R_i − ∂_i fpe_over_p, simplified (0 each)

    @property
    def holds(self) -> bool:
        return self.log_identity == 0 and all(e == 0 for e in self.score_identity)


@functools.cache
def derive(dim: int) -> Derivation:
    """The derivation in ``dim`` space dimensions (1 or 2; 3 works too but is slower)."""
    if not isinstance(dim, int) or not 1 <= dim <= 3:
        raise ValueError(f"dim must be an int in [1, 3]; got {dim!r}")
    t = sp.Symbol("t", real=True)
    x = sp.symbols(f"x1:{dim + 1}", real=True)
    g = sp.Function("g")(t)
    f = [sp.Function(f"f{i + 1}")(*x, t) for i in range(dim)]
    u = sp.Function("u")(*x, t)
    p = sp.exp(u)

    div = lambda v: sum(sp.diff(v[i], x[i]) for i in range(dim))  # noqa: E731
    grad = lambda phi: [sp.diff(phi, xi) for xi in x]  # noqa: E731

    fpe = sp.diff(p, t) + div([fi * p for fi in f]) - g**2 / 2 * sum(sp.diff(p, xi, 2) for xi in x)
    fpe_over_p = sp.expand(sp.simplify(fpe / p))

    grad_u = grad(u)
    rhs_log = g**2 / 2 * (div(grad_u) + sum(d**2 for d in grad_u)) - sum(fi * d for fi, d in zip(f, grad_u)) - div(f)
    log_fpe = sp.diff(u, t) - rhs_log

    s = grad_u
    phi = g**2 / 2 * div(s) + g**2 / 2 * sum(si**2 for si in s) - sum(fi * si for fi, si in zip(f, s)) - div(f)
    residual = [sp.diff(si, t) - dphi for si, dphi in zip(s, grad(phi))]

    log_identity = sp.simplify(sp.expand(fpe_over_p - log_fpe))
    score_identity = [sp.simplify(sp.expand(r - sp.diff(fpe_over_p, xi))) for r, xi in zip(residual, x)]
    return Derivation(dim, fpe_over_p, log_fpe, residual, log_identity, score_identity)


def main() -> None:
    for dim in (1, 2):
        d = derive(dim)
        print(f"== D = {dim}: f = (f_1..f_{dim})(x, t), g = g(t), p = exp(u(x, t)) ==")
        print("  FPE[p]/p = (∂_t p + ∇·(f p) − ½g² Δp)/p =")
        print("     ", d.fpe_over_p)
        print("  FPE[p]/p − (∂_t u − ½g²(Δu + |∇u|²) + <f,∇u> + ∇·f)  simplifies to:", d.log_identity)
        for i, (r, e) in enumerate(zip(d.score_residual, d.score_identity)):
            print(f"  score residual R_{i + 1} at s = ∇u:")
            print("     ", sp.expand(r))
            print(f"  R_{i + 1} − ∂_{{x{i + 1}}}(FPE[p]/p)  simplifies to:", e)
        print("  => the density FPE implies the score FPE:", d.holds)


if __name__ == "__main__":
    main()
