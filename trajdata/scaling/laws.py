"""Closed forms shared by the fits, their bootstrap and the forecasts: the quadratic law's design matrix, and
each parametric law's compute-optimal allocation x* = g + a·ln C under C = k·N·D."""
from __future__ import annotations

import numpy as np

PARAMETRIC = {False: ("quadratic", "chinchilla"), True: ("quadratic",)}  # by `maximize`


def quad_design(x, y):
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], 1)


def quad_alloc(beta, k):
    """Stationary point of beta·[1, x, y, x², xy, y²] on x + y = ln(C/k): x* = g + a·ln C."""
    b0, b1, b2, b3, b4, b5 = beta
    K = 2 * (b3 - b4 + b5)
    a = (2 * b5 - b4) / K
    g = (b2 - b1) / K - a * np.log(k)
    return g, a


def chin_alloc(theta, k):
    """Lagrange under C = k·N·D: x* = g + a·ln C with a = beta / (alpha + beta)."""
    e, a, b, al, be = theta
    a_exp = be / (al + be)
    log_g = (np.log(al) + a - np.log(be) - b) / (al + be)
    return log_g - a_exp * np.log(k), a_exp
