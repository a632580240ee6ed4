"""Bootstrap intervals for every fit and forecast: redraw what is noisy, rerun the same fits.

Noise, per target (loss or return), in the space each fit works in (ln target where it is positive):

1. validation noise of each run: its per-episode losses resampled where the runs table carries them
   (one draw of episodes shared by every run, since runs are validated on the same episodes),
   else value + SE x N(0, 1);
2. run noise the SEs do not explain (seeds, training noise, misfit): N(0, sigma_run²) per point, with
   sigma_run² the fit's residual variance beyond the SEs (0 where the SEs explain the scatter);
3. budget noise (isoFLOP method): N(0, tau²) per budget optimum, tau² the scatter of the optima about
   their power law beyond the optima's own SEs.

Each draw reruns the fit the point estimate used: per budget the window about the observed optimum,
the parabola and its checks, the power-law regression (same weights), the E + A·C^-k curve (damped
Gauss-Newton from the point estimate); the quadratic's least squares over the draw's windows;
Chinchilla's L-BFGS-B from the point estimate. Everything but Chinchilla is vectorised over draws.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from trajdata.scaling.config import FitConfig
from trajdata.scaling.laws import PARAMETRIC, chin_alloc, quad_alloc, quad_design
from trajdata.scaling.runs import Runs

# the parameters each method's forecast needs, one row per draw
COLUMNS = {"isoflop": ("log_gn", "a", "y_E", "y_a", "y_k"),
           "quadratic": ("b0", "b_lnN", "b_lnD", "b_lnN2", "b_lnNlnD", "b_lnD2"),
           "chinchilla": ("log_E", "log_A", "log_B", "alpha", "beta")}
CHUNK = 128  # draws per block of episode resampling (bounds memory at ~CHUNK x episodes)


# ---------------------------------------------------------------- 1. validation noise

def episode_matrix(per_episode) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sums, steps, has) over the union of episode ids: sums[i, e] = loss·steps of run i on episode e."""
    ids = sorted({e for p in per_episode if p is not None for e in p[0]})
    col = {e: j for j, e in enumerate(ids)}
    S = np.zeros((len(per_episode), len(ids)))
    W = np.zeros_like(S)
    for i, p in enumerate(per_episode):
        if p is None:
            continue
        j = np.array([col[e] for e in p[0]])
        S[i, j] = p[1] * p[2]
        W[i, j] = p[2]
    return S, W, np.array([p is not None for p in per_episode])


def validation_draws(values: np.ndarray, se: np.ndarray | None, per_episode, B: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(B x runs) redrawn values and how: episodes resampled where given, else value + SE·N(0,1)."""
    n = len(values)
    out = np.tile(values, (B, 1))
    how = []
    has = np.zeros(n, bool)
    if per_episode is not None:
        S, W, has = episode_matrix(per_episode)
        E = S.shape[1]
        # resampling E clusters shrinks the variance by (E-1)/E, and a variance from E clusters is itself
        # uncertain: widen by t(E-1)/z as a t-interval would (a small-sample correction; ~1 for E >= 100)
        inflate = np.sqrt(E / (E - 1)) * stats.t.ppf(0.975, E - 1) / stats.norm.ppf(0.975) if E > 1 else 1.0
        for lo in range(0, B, CHUNK):
            w = rng.multinomial(E, np.full(E, 1.0 / E), size=min(CHUNK, B - lo)).astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                v = values[has] + inflate * ((w @ S[has].T) / (w @ W[has].T) - values[has])
            out[lo:lo + len(w), has] = np.where(np.isfinite(v), v, values[has])
        how.append(f"{E} validation episodes resampled (shared by the runs) for {int(has.sum())} runs")
    rest = ~has
    if se is not None and rest.any():
        s = np.where(np.isfinite(se), se, 0.0)
        out[:, rest] += s[rest] * rng.standard_normal((B, int(rest.sum())))
        how.append(f"value + SE x N(0,1) for {int(rest.sum())} runs")
    if (values > 0).all():
        out = np.maximum(out, 1e-6 * values)  # a draw never flips the sign of a positive target
    return out, "; ".join(how) or "none (no SEs or per-episode losses)"


# ---------------------------------------------------------------- 2. the isoFLOP method, vectorised

def _cell_matrix(runs: Runs):
    """Cells (budget, size) as in the point fit and the (runs x cells) averaging matrix."""
    keys = np.stack([runs.flops, runs.params], 1)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.ravel()
    A = np.zeros((len(runs), len(uniq)))
    A[np.arange(len(runs)), inv] = 1.0
    return uniq[:, 0], uniq[:, 1], A / A.sum(0)


def isoflop_draws(C, N, T, cfg: FitConfig, maximize: bool) -> dict:
    """Per budget and draw: ln N_opt, the fit-space target there, kept, window edges (in N)."""
    sign = -1.0 if maximize else 1.0
    budgets = np.unique(C)
    B = T.shape[0]
    out = {k: np.full((B, len(budgets)), np.nan) for k in ("v", "t", "wlo", "whi")}
    out["kept"] = np.zeros((B, len(budgets)), bool)
    rows = np.arange(B)
    for j, c in enumerate(budgets):
        idx = np.flatnonzero(C == c)
        idx = idx[np.argsort(N[idx])]
        n = len(idx)
        x_all = np.log(N[idx])
        xbar = x_all.mean()
        x = x_all - xbar
        t = T[:, idx]
        best = np.argmin(sign * t, 1)
        if cfg.window <= 0:
            lo, hi = np.zeros(B, int), np.full(B, n)
        else:
            lo, hi = np.maximum(0, best - cfg.window), np.minimum(n, best + cfg.window + 1)
        ok = hi - lo >= cfg.min_points
        if cfg.optimum == "argmin":
            kept = ok & (best > 0) & (best < n - 1)
            v, tv = x_all[best], t[rows, best]
        else:
            J = np.arange(n)
            M = ((J >= lo[:, None]) & (J < hi[:, None])).astype(float)
            X = np.stack([x * x, x, np.ones_like(x)], 1)
            A = np.einsum("bn,ni,nk->bik", M, X, X)
            A[~ok] = np.eye(3)
            r = np.einsum("bn,ni->bi", M * t, X)
            coef = np.linalg.solve(A, r[..., None])[..., 0]
            c2, c1, c0 = coef.T
            with np.errstate(divide="ignore", invalid="ignore"):
                vc = -c1 / (2 * c2)
                tv = c0 - c1 * c1 / (4 * c2)
            kept = ok & (sign * c2 > 0) & (vc >= x[lo]) & (vc <= x[hi - 1])
            v = vc + xbar
        out["v"][:, j] = np.where(kept, v, np.nan)
        out["t"][:, j] = np.where(kept, tv, np.nan)
        out["kept"][:, j] = kept
        out["wlo"][:, j], out["whi"][:, j] = N[idx][lo], N[idx][hi - 1]
    out["budgets"] = budgets
    return out


def wls_lines(x: np.ndarray, Y: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of Y (draws x points) with weights W (0 = left out): intercept and slope on x."""
    sw, sx, sxx = W.sum(1), W @ x, W @ (x * x)
    Yz = np.where(W > 0, Y, 0.0)
    sy, sxy = (W * Yz).sum(1), (W * Yz) @ x
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
        return (sy - slope * sx) / sw, slope


def power_plus_const_draws(u: np.ndarray, LY: np.ndarray, M: np.ndarray, theta0, iters: int = 60) -> np.ndarray:
    """ln Y = ln(E + exp(a - k·u)) fitted per row (bounds E >= 0, |a| <= 50, 0 <= k <= 20) by damped
    Gauss-Newton (Levenberg-Marquardt) from theta0; M masks the points of each row."""
    B = LY.shape[0]
    th = np.tile(np.asarray(theta0, float), (B, 1))
    lo, hi = np.array([0.0, -50.0, 0.0]), np.array([np.inf, 50.0, 20.0])
    LYz = np.where(M, LY, 0.0)

    def resid(th):
        E, a, k = (th[:, i:i + 1] for i in range(3))
        q = np.exp(np.clip(a - k * u, -700, 700))
        s = E + q
        return (np.log(s) - LYz) * M, q, s

    r, q, s = resid(th)
    cost = (r * r).sum(1)
    lam = np.full(B, 1e-3)
    eye = np.eye(3)
    for _ in range(iters):
        Jm = np.stack([1 / s, q / s, -u * q / s], -1) * M[..., None]
        JtJ = np.einsum("bmi,bmj->bij", Jm, Jm)
        g = np.einsum("bmi,bm->bi", Jm, r)
        D = np.einsum("bii->bi", JtJ) + 1e-12
        A = JtJ + lam[:, None, None] * D[:, :, None] * eye
        try:
            step = np.linalg.solve(A, -g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = -g / D
        new = np.clip(th + np.nan_to_num(step), lo, hi)
        r2, q2, s2 = resid(new)
        c2 = (r2 * r2).sum(1)
        ok = np.isfinite(c2) & (c2 <= cost)
        th[ok], cost[ok], r[ok], q[ok], s[ok] = new[ok], c2[ok], r2[ok], q2[ok], s2[ok]
        lam = np.where(ok, lam / 3, lam * 5)
        if (lam > 1e12).all():
            break
    return th


def isoflop_params(fit: dict, C, N, T, cfg: FitConfig, maximize: bool, rng) -> tuple[np.ndarray, dict]:
    """(draws x COLUMNS["isoflop"]) and the draws' per-budget windows, or NaN rows where a draw fails."""
    iso = fit["isoflop"]
    noise = iso["noise"]
    d = isoflop_draws(C, N, T, cfg, maximize)
    B = T.shape[0]
    lc = np.log(d["budgets"])
    kept_pt = {p["flops"]: p for p in iso["profiles"] if p["kept"]}
    tau_n, tau_y = noise.get("tau_n", 0.0), noise.get("tau_y", 0.0)
    # the point estimate's weights, per budget (budgets it did not keep: the median weight)
    if noise["weighted"]:
        w = np.array([1.0 / (kept_pt[c]["n_opt_se"] ** 2 + tau_n ** 2) if c in kept_pt else np.nan
                      for c in d["budgets"]])
        w = np.where(np.isfinite(w), w, np.nanmedian(w))
    else:
        w = np.ones(len(lc))
    V = d["v"] + tau_n * rng.standard_normal(d["v"].shape)
    W = np.where(d["kept"], w, 0.0)
    g, a = wls_lines(lc, V, W)
    ok = d["kept"].sum(1) >= 3
    P = np.full((B, 5), np.nan)
    P[ok, 0], P[ok, 1] = g[ok], a[ok]
    yf = iso["Y_opt"]
    if yf is not None:
        # fitted quantity: the target, or its inverse for a maximised target; in logs
        Tv = d["t"] + tau_y * rng.standard_normal(d["t"].shape)
        if iso["profiles"][0]["log_target"]:
            LY = -Tv if maximize else Tv
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                LY = np.log(1.0 / Tv if maximize else Tv)
        M = d["kept"] & np.isfinite(LY)
        u = lc - yf["log_c0"]
        if yf["form"].startswith("power law"):
            icpt, slope = wls_lines(u, LY, M.astype(float))
            th = np.stack([np.zeros(B), icpt, -slope], 1)
        else:
            th = power_plus_const_draws(u, LY, M, yf["theta"])
        good = ok & (M.sum(1) >= 3)
        P[good, 2:] = th[good]
    return P, d


# ---------------------------------------------------------------- 3. the parametric fits

def parametric_mask(runs: Runs, d: dict | None, cfg: FitConfig) -> np.ndarray | None:
    """(draws x runs): the runs inside each draw's kept windows (None: all runs, every draw)."""
    if d is None or cfg.parametric_points == "all":
        return None
    j = np.searchsorted(d["budgets"], runs.flops)
    return d["kept"][:, j] & (runs.params >= d["wlo"][:, j]) & (runs.params <= d["whi"][:, j])


def quadratic_params(runs: Runs, T: np.ndarray, M: np.ndarray | None) -> np.ndarray:
    """(draws x 6) least squares of each draw's ln target on the quadratic design, over its runs."""
    x, y = np.log(runs.params), np.log(runs.samples)
    x0, y0 = x.mean(), y.mean()
    X = quad_design(x - x0, y - y0)  # centred: well conditioned normal equations
    Mf = np.ones_like(T) if M is None else M.astype(float)
    A = np.einsum("bn,ni,nj->bij", Mf, X, X)
    rhs = np.einsum("bn,ni->bi", Mf * T, X)
    ok = (Mf.sum(1) >= 7) & (np.linalg.matrix_rank(A) == 6)
    A[~ok] = np.eye(6)
    c = np.linalg.solve(A, rhs[..., None])[..., 0]
    c0, c1, c2, c3, c4, c5 = c.T
    beta = np.stack([c0 - c1 * x0 - c2 * y0 + c3 * x0 ** 2 + c4 * x0 * y0 + c5 * y0 ** 2,
                     c1 - 2 * c3 * x0 - c4 * y0, c2 - c4 * x0 - 2 * c5 * y0, c3, c4, c5], 1)
    beta[~ok] = np.nan
    return beta


def _chin_batch(th, x, y, T, M, d):
    """Huber objective (per row), residuals and softmax weights of ln(e^e + e^(a-αx) + e^(b-βy)) - T."""
    z = np.stack([th[:, 1:2] - th[:, 3:4] * x, th[:, 2:3] - th[:, 4:5] * y,
                  np.broadcast_to(th[:, 0:1], T.shape)], -1)
    m = z.max(-1, keepdims=True)
    ez = np.exp(z - m)
    s = ez.sum(-1, keepdims=True)
    r = (m[..., 0] + np.log(s[..., 0]) - T) * M
    ar = np.abs(r)
    obj = np.where(ar <= d, 0.5 * r * r, d * (ar - 0.5 * d)).sum(1)
    return obj, r, ez / s


def chinchilla_params(runs: Runs, T: np.ndarray, M: np.ndarray | None, theta0, cfg: FitConfig,
                      iters: int = 200) -> np.ndarray:
    """(draws x 5): the Huber fit of ln L per draw by iteratively reweighted, damped Gauss-Newton
    (Levenberg-Marquardt) from the point estimate, vectorised over draws."""
    x, y = np.log(runs.params), np.log(runs.samples)
    B = T.shape[0]
    Mf = np.ones_like(T) if M is None else M.astype(float)
    d = cfg.huber_delta
    th = np.tile(np.asarray(theta0, float), (B, 1))
    obj, r, w = _chin_batch(th, x, y, T, Mf, d)
    lam = np.full(B, 1e-3)
    eye = np.eye(5)
    act = np.arange(B)  # rows still moving
    for _ in range(iters):
        if not len(act):
            break
        Ma, Ta, ra, wa = Mf[act], T[act], r[act], w[act]
        J = np.stack([wa[..., 2], wa[..., 0], wa[..., 1], -wa[..., 0] * x, -wa[..., 1] * y], -1) * Ma[..., None]
        hw = np.minimum(1.0, d / np.maximum(np.abs(ra), 1e-300))  # Huber's IRLS weights
        Jw = J * hw[..., None]
        JtJ = np.matmul(Jw.transpose(0, 2, 1), J)
        g = np.matmul(Jw.transpose(0, 2, 1), ra[..., None])[..., 0]
        D = np.einsum("bii->bi", JtJ) + 1e-15
        try:
            step = np.linalg.solve(JtJ + lam[act, None, None] * D[:, :, None] * eye, -g[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = -g / D
        new = th[act] + np.nan_to_num(step)
        o2, r2, w2 = _chin_batch(new, x, y, Ta, Ma, d)
        ok = np.isfinite(o2) & (o2 <= obj[act])
        gain = obj[act] - o2
        acc = act[ok]
        th[acc], obj[acc], r[acc], w[acc] = new[ok], o2[ok], r2[ok], w2[ok]
        lam[act] = np.where(ok, lam[act] / 3, lam[act] * 4)
        done = (ok & (gain <= 1e-13 * np.maximum(obj[act], 1e-300))) | (lam[act] > 1e10)
        act = act[~done]
    th[Mf.sum(1) < 6] = np.nan
    return th


def exponent(method: str, P: np.ndarray, k: float) -> np.ndarray:
    """The N_opt exponent a of each draw."""
    if method == "isoflop":
        return P[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return (quad_alloc(P.T, k) if method == "quadratic" else chin_alloc(P.T, k))[1]


# ---------------------------------------------------------------- everything

def bootstrap_target(runs: Runs, values, se, per_episode, fit: dict, cfg: FitConfig, maximize: bool,
                     rng: np.random.Generator, progress: bool) -> dict:
    """Draws of every method's forecast parameters for one target: {method: (draws x COLUMNS)}."""
    B = cfg.bootstrap
    lin, how = validation_draws(values, se, per_episode, B, rng)
    positive = bool((values > 0).all())
    out = {"validation_noise": how, "params": {}}
    d = None
    if "isoflop" in fit:
        C, N, A = _cell_matrix(runs)
        cells = lin @ A
        prof = fit["isoflop"]["profiles"]
        use_log = prof[0]["log_target"] and positive
        T = np.log(cells) if use_log else cells
        sig = fit["isoflop"]["noise"].get("sigma_run") or 0.0
        T = T + sig * rng.standard_normal(T.shape)
        out["params"]["isoflop"], d = isoflop_params(fit, C, N, T, cfg, maximize, rng)
    M = parametric_mask(runs, d, cfg) if "isoflop" in fit else None
    for meth in PARAMETRIC[maximize]:
        if meth not in fit or not positive:
            continue
        f = fit[meth]
        T = np.log(lin) + f.get("sigma_run", 0.0) * rng.standard_normal(lin.shape)
        if meth == "quadratic":
            out["params"][meth] = quadratic_params(runs, T, M)
        else:
            out["params"][meth] = chinchilla_params(runs, T, M, np.array(f["theta"]), cfg)
    return out


def percentile_ci(v: np.ndarray, level: float) -> list[float]:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return [float("nan"), float("nan")]
    return [float(np.percentile(v, 50 * (1 - level))), float(np.percentile(v, 50 * (1 + level)))]


def bootstrap(runs: Runs, fit: dict, cfg: FitConfig, progress: bool = False) -> dict:
    """The bootstrap section of fit.json: per exponent {median, ci, n}, and each method's draws."""
    rng = np.random.default_rng(cfg.seed)
    k = cfg.flops_per_param_sample
    targets = [("loss", runs, runs.loss, runs.loss_se, runs.loss_episodes, False)] if "loss" in fit else []
    if "return" in fit:
        rr = runs.subset(np.isfinite(runs.ret))
        targets.append(("return", rr, rr.ret, rr.ret_se, None, True))
    summary, draws, noise = {}, {}, {}
    for name, rs, values, se, per_ep, maximize in targets:
        res = bootstrap_target(rs, values, se, per_ep, fit[name], cfg, maximize, rng, progress)
        noise[name] = res["validation_noise"]
        draws[name] = {}
        for meth, P in res["params"].items():
            a = exponent(meth, P, k)
            ok = np.isfinite(a)
            summary[f"{name}.{meth}.a"] = {"median": float(np.median(a[ok])) if ok.any() else float("nan"),
                                            "ci": percentile_ci(a, cfg.ci_level), "n": int(ok.sum())}
            summary[f"{name}.{meth}.b"] = {"median": 1 - summary[f"{name}.{meth}.a"]["median"],
                                            "ci": [1 - c for c in summary[f"{name}.{meth}.a"]["ci"][::-1]],
                                            "n": int(ok.sum())}
            if meth == "isoflop" and name == "loss":
                kd = P[:, 4][np.isfinite(P[:, 4])]
                summary["loss.isoflop.k"] = {"median": float(np.median(kd)) if len(kd) else float("nan"),
                                             "ci": percentile_ci(P[:, 4], cfg.ci_level), "n": int(len(kd))}
            draws[name][meth] = {"columns": list(COLUMNS[meth]),
                                 "values": [[float(f"{v:.7g}") for v in row] for row in P]}
    summary["draws"] = cfg.bootstrap
    summary["validation_noise"] = noise
    return summary, draws
