"""Independent sympy derivations for fpe_lab (FP-Diffusion, Lai et al. 2023, arXiv 2210.04296).

Nothing in ``fpe_lab`` imports this package; the tests compare the two. Each module stands on its
own and prints what it derives when run as a script:

* ``python -m analytic.score_fpe``  -- (a) the score FPE from the density FPE for general f(x, t),
  g(t), in 1D and 2D, shown to hold symbolically.
* ``python -m analytic.marginals``  -- (b) alpha(t), sigma(t) of VE, VP and sub-VP from their moment
  ODEs (``sympy.dsolve``).
* ``python -m analytic.gmm_terms``  -- (c) closed forms of every score-FPE term for Gaussians and
  Gaussian mixtures under the three SDEs, lambdified into numpy functions (the tests' reference).
"""
