"""Conjugate gradient on Sigma_i rho_i = mu_i, tracked against kappa(Sigma_i): the bound
(bound.py), Sigma_i and CG in float64 (reference.py), and the kernel's side with the
per-query records that ``lla-verify cg`` and the CG properties read (kernel.py)."""
