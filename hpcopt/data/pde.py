"""Scientific data sets for training surrogates of PDE solvers, generated in parallel (docs/data.md).

Three problems, each sample a pure function of (problem, parameters, seed, split, sample index):

    darcy2d    -div(a grad u) = f on (0,1)^2, u = 0 on the boundary, f = 1;   x = a (1,G,G), y = u (G,G)
    heat2d     u_t = kappa lap u on (0,1)^2, u = 0 on the boundary;          x = u(0) (1,G,G), y = u(T) (G,G)
    burgers1d  u_t + (u^2/2)_x = nu u_xx on [0,1) periodic;                  x = u(0) (G,), y = u(T) (G,)

The random inputs are Gaussian random fields drawn by a spectral (Karhunen-Loeve) sum evaluated with
numpy's FFT, from the counter-based stream Philox(key=[seed, index]) where index = j for training
sample j and 2**63 + j for test sample j: sample j does not depend on how many samples are made, on the
test fraction, on how the samples are split among ranks, nor on the order they are made in.

`make_pde` writes one HDF5 file: /train/x, /train/y, /test/x, /test/y as float32 (N, *shape), chunked
in blocks of whole samples, and /stats (the training targets' mean and std); all ranks of `comm` write it together through h5py's `mpio` driver, each
rank the pieces it generated, under a temporary name that rank 0 renames once every rank is done.

    hpcopt data make darcy2d OUT.h5 --samples 1000 --grid 64      (alone or under mpirun)
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import ConfigError, DataError

PROBLEMS = ("darcy2d", "heat2d", "burgers1d")
FORMAT_VERSION = 1
TEST_OFFSET = 1 << 63  # Philox key of test sample j: (seed, TEST_OFFSET + j)
SPLITS = ("train", "test")

# Parameters of each problem and their defaults (None: derived from the grid, see resolve_params).
DEFAULTS = {
    # Li et al. 2021 (FNO): psi ~ N(0, (-lap + 9)^-2) with Neumann conditions, a = 12 / 3 on psi >= 0 / < 0.
    "darcy2d": dict(coefficient="threshold", alpha=2.0, tau=3.0, sigma=None, a_high=12.0, a_low=3.0,
                    forcing=1.0, solver="auto", refine=1, modes=None),
    # Initial condition as FNO's Navier-Stokes vorticity: N(0, 7^1.5 (-lap + 49)^-2.5), here in the
    # Dirichlet (sine) basis so that it vanishes on the boundary.
    "heat2d": dict(kappa=0.01, T=1.0, steps=None, alpha=2.5, tau=7.0, sigma=None, refine=1, modes=None),
    # Li et al. 2021 (FNO): u0 ~ N(0, 625 (-lap + 25)^-2) periodic; FNO used nu = 0.1, PDEBench 1e-3 .. 4.
    "burgers1d": dict(nu=0.01, T=1.0, cfl=0.4, scheme="muscl", alpha=2.0, tau=5.0, sigma=25.0, refine=1,
                      modes=None),
}
CHOICES = {"coefficient": ("threshold", "lognormal"), "solver": ("auto", "cholesky", "pcg"),
           "scheme": ("muscl", "rusanov")}
AUTO_CHOLESKY_MAX_GRID = 80  # darcy2d solver "auto": banded Cholesky up to this grid, IC(0)-PCG above
PCG_RTOL = 1e-12


# ---------------------------------------------------------------------------------------------------
# Parameters, shapes, streams


def resolve_params(problem: str, grid: int, params: dict | None = None) -> dict:
    """The problem's full parameter set: DEFAULTS overridden by `params` (None values ignored), checked.
    Raises ConfigError naming the bad parameter."""
    if problem not in PROBLEMS:
        raise ConfigError(f"unknown PDE problem {problem!r} (choose from {', '.join(PROBLEMS)})")
    minimum = 8 if problem == "burgers1d" else 5
    if not _is_int(grid) or grid < minimum:
        raise ConfigError(f"{problem}: grid must be an integer >= {minimum} (got {grid!r})")
    p = dict(DEFAULTS[problem])
    for k, v in (params or {}).items():
        if k not in p:
            raise ConfigError(f"{problem}: unknown parameter {k!r} (parameters: {', '.join(p)})")
        if v is not None:
            p[k] = v
    for k, allowed in CHOICES.items():
        if k in p and p[k] not in allowed:
            raise ConfigError(f"{problem}: {k} must be one of {', '.join(allowed)} (got {p[k]!r})")
    for k in ("alpha", "tau", "kappa", "T", "cfl", "a_high", "a_low", "sigma", "nu", "forcing"):
        if k not in p or (k == "sigma" and p[k] is None):
            continue
        v = p[k]
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and (v >= 0 if k in ("nu", "forcing") else v > 0)):
            sign = "non-negative" if k in ("nu", "forcing") else "positive"
            raise ConfigError(f"{problem}: {k} must be a {sign} number (got {v!r})")
    if "cfl" in p and p["cfl"] > 1.0:
        raise ConfigError(f"{problem}: cfl must be in (0, 1] (got {p['cfl']})")
    if p.get("sigma") is None:
        p["sigma"] = p["tau"] ** (p["alpha"] - 1.0)  # FNO's scaling of the field
    if not _is_int(p["refine"]) or p["refine"] < 1:
        raise ConfigError(f"{problem}: refine must be an integer >= 1 (got {p['refine']!r})")
    p["refine"] = int(p["refine"])
    if p["modes"] is None:  # resolved by the stored grid: refine changes the accuracy, not the sample
        p["modes"] = max_modes(problem, grid)
    limit = max_modes(problem, solver_grid(problem, grid, p["refine"]))
    if not _is_int(p["modes"]) or not 1 <= p["modes"] <= limit:
        raise ConfigError(f"{problem}: modes must be an integer in [1, {limit}] (got {p['modes']!r})")
    p["modes"] = int(p["modes"])
    if problem == "heat2d":
        if p["steps"] is None:  # dt ~ h: the time error O(dt^2) shrinks with the space error O(h^2)
            p["steps"] = solver_grid(problem, grid, p["refine"]) - 1
        if not _is_int(p["steps"]) or p["steps"] < 1:
            raise ConfigError(f"heat2d: steps must be an integer >= 1 (got {p['steps']!r})")
        p["steps"] = int(p["steps"])
    if problem == "darcy2d" and p["solver"] == "auto":
        fine = solver_grid(problem, grid, p["refine"])
        p["solver"] = "cholesky" if fine <= AUTO_CHOLESKY_MAX_GRID else "pcg"
    for k, v in p.items():
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and k not in ("steps", "refine", "modes"):
            p[k] = float(v)
    return p


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def solver_grid(problem: str, grid: int, refine: int) -> int:
    """The grid the solver runs on: `refine` times finer than the stored one (FNO solved Darcy on 421^2
    nodes and kept every 5th, 85^2; its Burgers data were solved on 8192 points and subsampled)."""
    return grid * refine if problem == "burgers1d" else (grid - 1) * refine + 1


def shapes(problem: str, grid: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input_shape, target_shape) of one sample. A 2-D input field has one channel axis, (1, G, G): the
    (C, H, W) layout the repository's conv2d models take (model.input = [1, G, G])."""
    if problem == "burgers1d":
        return (grid,), (grid,)
    return (1, grid, grid), (grid, grid)


def stream(seed: int, index: int, split: str = "train") -> np.random.Generator:
    """The sample's own counter-based stream: Philox keyed (seed, index), index + 2**63 for test."""
    if split not in SPLITS:
        raise ConfigError(f"split must be train or test (got {split!r})")
    if not 0 <= index < TEST_OFFSET or not 0 <= seed < 1 << 64:
        raise ConfigError(f"sample index must be in [0, 2**63) and seed in [0, 2**64) (got {index}, {seed})")
    key = np.array([seed, index + (TEST_OFFSET if split == "test" else 0)], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


# ---------------------------------------------------------------------------------------------------
# Gaussian random fields by spectral sums (numpy's FFT: pocketfft, deterministic, one thread)


def _nodal_series(c: np.ndarray, grid: int, kind: str, axis: int) -> np.ndarray:
    """Evaluate sum_k c_k e_k(x_j) along `axis` at the nodes x_j = j/(grid-1), j = 0..grid-1, where
    e_0 = 1, e_k = sqrt(2) cos(k pi x) (kind "cos") or e_k = sqrt(2) sin(k pi x) (kind "sin"): the
    L2(0,1)-orthonormal Neumann / Dirichlet eigenfunctions. A DCT-I / DST-I through one irfft of
    length 2(grid-1); c has at most grid-1 entries along `axis` (modes 0..grid-2)."""
    n = 2 * (grid - 1)
    c = np.moveaxis(c, axis, -1)
    k = c.shape[-1]
    X = np.zeros(c.shape[:-1] + (n // 2 + 1,), dtype=np.complex128)
    if kind == "cos":
        X[..., :k] = c * (n / math.sqrt(2.0))
        X[..., 0] = c[..., 0] * n
    else:
        X[..., :k] = c * (-1j * n / math.sqrt(2.0))
        X[..., 0] = 0.0
    out = np.fft.irfft(X, n=n, axis=-1)[..., :grid]
    return np.moveaxis(out, -1, axis)


def max_modes(problem: str, grid: int) -> int:
    """The most KL modes per axis a grid resolves (and the default): cosines 0..grid-2 (darcy2d),
    sines 1..grid-2 (heat2d), Fourier 1..grid/2-1 (burgers1d)."""
    return {"darcy2d": grid - 1, "heat2d": grid - 2, "burgers1d": grid // 2 - 1}[problem]


def grf2d(rng: np.random.Generator, grid: int, alpha: float, tau: float, sigma: float,
          kind: str = "cos", modes: int | None = None) -> np.ndarray:
    """psi ~ N(0, sigma^2 (-lap + tau^2)^-alpha) on the unit square at the grid x grid nodes, by its
    Karhunen-Loeve sum over `modes` x `modes` eigenfunctions: Neumann cosines k, l = 0..modes-1 with
    the mean mode removed (as FNO's GRF.m), or Dirichlet sines k, l = 1..modes. Draws modes^2 standard
    normals from rng, in an order that does not depend on `grid`: the same rng and modes give the same
    field on any grid that resolves them."""
    K = max_modes("darcy2d" if kind == "cos" else "heat2d", grid) if modes is None else int(modes)
    if not 1 <= K <= max_modes("darcy2d" if kind == "cos" else "heat2d", grid):
        raise ConfigError(f"{K} modes per axis do not fit a grid of {grid}")
    xi = rng.standard_normal((K, K))
    k = np.arange(K, dtype=np.float64) + (0.0 if kind == "cos" else 1.0)
    lam = math.pi ** 2 * (k[:, None] ** 2 + k[None, :] ** 2)
    coef = sigma * (lam + tau * tau) ** (-alpha / 2.0) * xi
    if kind == "cos":
        coef[0, 0] = 0.0
    else:  # index = mode number: a zero row and column for mode 0
        coef = np.pad(coef, ((1, 0), (1, 0)))
    psi = _nodal_series(_nodal_series(coef, grid, kind, 0), grid, kind, 1)
    if kind == "sin":  # sin(k pi) is 0 exactly, its FFT sum only to rounding
        psi[[0, -1], :] = 0.0
        psi[:, [0, -1]] = 0.0
    return psi


def grf1d_periodic(rng: np.random.Generator, grid: int, alpha: float, tau: float, sigma: float,
                   modes: int | None = None) -> np.ndarray:
    """u ~ N(0, sigma^2 (-d_xx + tau^2)^-alpha) on [0,1) periodic, zero mean, at the cell centres
    x_j = (j + 1/2)/grid, by its Fourier sum over the modes k = 1..modes (default grid/2 - 1). Draws
    2 modes standard normals; grids that resolve the modes see the same function."""
    K = max_modes("burgers1d", grid) if modes is None else int(modes)
    if not 1 <= K <= max_modes("burgers1d", grid):
        raise ConfigError(f"{K} Fourier modes do not fit a grid of {grid}")
    ab = rng.standard_normal((2, K))
    k = np.arange(1, K + 1, dtype=np.float64)
    coef = sigma * (4.0 * math.pi ** 2 * k ** 2 + tau * tau) ** (-alpha / 2.0)
    X = np.zeros(grid // 2 + 1, dtype=np.complex128)
    X[1:K + 1] = coef * (ab[0] - 1j * ab[1]) * (grid / math.sqrt(2.0)) * np.exp(1j * math.pi * k / grid)
    return np.fft.irfft(X, n=grid)


# ---------------------------------------------------------------------------------------------------
# Numba kernels: banded Cholesky, IC(0)-preconditioned CG, the three discretisations


@njit(cache=True)
def _dot4(x, y, n):
    """sum_k<n x[k] y[k] in 4 interleaved partial sums: a fixed order, so the same bits every time."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k = 0
    while k + 3 < n:
        s0 += x[k] * y[k]
        s1 += x[k + 1] * y[k + 1]
        s2 += x[k + 2] * y[k + 2]
        s3 += x[k + 3] * y[k + 3]
        k += 4
    while k < n:
        s0 += x[k] * y[k]
        k += 1
    return (s0 + s1) + (s2 + s3)


@njit(cache=True)
def _band_cholesky(L, m):
    """In place: L (n, m+1) holds the lower band of an SPD matrix, L[p, k-p+m] = A[p, k] for
    p-m <= k <= p; on return the Cholesky factor in the same layout. Returns the first non-positive
    pivot's row, or -1. Work n m^2 / 2: exact (no iteration), fill-in stays inside the band."""
    n = L.shape[0]
    for p in range(n):
        k0 = max(0, p - m)
        rp = L[p, k0 - p + m:]  # row p from column k0
        for q in range(k0, p + 1):
            # A[p,q] - sum_{k0 <= k < q} L[p,k] L[q,k]
            s = rp[q - k0] - _dot4(rp, L[q, k0 - q + m:], q - k0)
            if q < p:
                rp[q - k0] = s / L[q, m]
            else:
                if not s > 0.0:
                    return p
                L[p, m] = math.sqrt(s)
    return -1


@njit(cache=True)
def _band_solve(L, m, b):
    """In place: b <- (L L^T)^-1 b for the band factor of _band_cholesky."""
    n = L.shape[0]
    for p in range(n):  # L y = b, by rows
        k0 = max(0, p - m)
        b[p] = (b[p] - _dot4(L[p, k0 - p + m:], b[k0:], p - k0)) / L[p, m]
    for p in range(n - 1, -1, -1):  # L^T x = y, by columns of L^T (rows of L)
        b[p] /= L[p, m]
        xp = b[p]
        k0 = max(0, p - m)
        row = L[p, k0 - p + m:m]
        seg = b[k0:p]
        for k in range(p - k0):
            seg[k] -= row[k] * xp


@njit(cache=True)
def _harm(a, b):
    return 2.0 * a * b / (a + b)


@njit(cache=True)
def _darcy_stencil(a):
    """The 5-point operator h^2 (-div(a grad .)) on the (G-2)^2 interior nodes of a G x G vertex grid,
    face coefficients the harmonic means of a at the two nodes: diag[p], west[p] = A[p, p-1] (the
    neighbour j-1), south[p] = A[p, p-m] (the neighbour i-1); p = (i-1) m + (j-1), m = G-2."""
    G = a.shape[0]
    m = G - 2
    n = m * m
    diag = np.empty(n)
    west = np.zeros(n)
    south = np.zeros(n)
    for i in range(1, G - 1):
        for j in range(1, G - 1):
            p = (i - 1) * m + (j - 1)
            c = a[i, j]
            kn = _harm(c, a[i + 1, j])
            ks = _harm(c, a[i - 1, j])
            ke = _harm(c, a[i, j + 1])
            kw = _harm(c, a[i, j - 1])
            diag[p] = kn + ks + ke + kw
            if j > 1:
                west[p] = -kw
            if i > 1:
                south[p] = -ks
    return diag, west, south


@njit(cache=True)
def _darcy_cholesky(a, rhs):
    """u (G, G) with zero boundary: h^2 (-div(a grad u)) = rhs on the interior, banded Cholesky."""
    G = a.shape[0]
    m = G - 2
    diag, west, south = _darcy_stencil(a)
    n = m * m
    L = np.zeros((n, m + 1))
    for p in range(n):
        L[p, m] = diag[p]
        L[p, m - 1] = west[p]
        L[p, 0] = south[p]
    bad = _band_cholesky(L, m)
    u = np.zeros((G, G))
    if bad >= 0:
        u[:, :] = np.nan
        return u
    b = np.empty(n)
    for i in range(m):
        for j in range(m):
            b[i * m + j] = rhs[i + 1, j + 1]
    _band_solve(L, m, b)
    for i in range(m):
        for j in range(m):
            u[i + 1, j + 1] = b[i * m + j]
    return u


@njit(cache=True)
def _stencil_apply(diag, west, south, m, x, out):
    n = m * m
    for p in range(n):
        s = diag[p] * x[p]
        if p >= 1:
            s += west[p] * x[p - 1]
        if p + 1 < n:
            s += west[p + 1] * x[p + 1]
        if p >= m:
            s += south[p] * x[p - m]
        if p + m < n:
            s += south[p + m] * x[p + m]
        out[p] = s


@njit(cache=True)
def _ic0_factor(diag, west, south, m):
    """Incomplete Cholesky IC(0) of the 5-point matrix: M = (D + Lo) D^-1 (D + Lo^T), Lo the strictly
    lower part of A; returns D."""
    n = m * m
    d = np.empty(n)
    for p in range(n):
        v = diag[p]
        if p >= 1 and west[p] != 0.0:
            v -= west[p] * west[p] / d[p - 1]
        if p >= m and south[p] != 0.0:
            v -= south[p] * south[p] / d[p - m]
        d[p] = v
    return d


@njit(cache=True)
def _ic0_apply(d, west, south, m, r, z):
    n = m * m
    for p in range(n):  # (D + Lo) y = r
        v = r[p]
        if p >= 1:
            v -= west[p] * z[p - 1]
        if p >= m:
            v -= south[p] * z[p - m]
        z[p] = v / d[p]
    for p in range(n - 1, -1, -1):  # (D + Lo^T) z = D y
        v = 0.0
        if p + 1 < n:
            v += west[p + 1] * z[p + 1]
        if p + m < n:
            v += south[p + m] * z[p + m]
        z[p] -= v / d[p]


@njit(cache=True)
def _darcy_pcg(a, rhs, rtol, maxiter):
    """As _darcy_cholesky by conjugate gradients preconditioned with IC(0), to ||r|| <= rtol ||b||.
    Returns (u, iterations); iterations = -1 if it did not converge in maxiter."""
    G = a.shape[0]
    m = G - 2
    n = m * m
    diag, west, south = _darcy_stencil(a)
    d = _ic0_factor(diag, west, south, m)
    b = np.empty(n)
    for i in range(m):
        for j in range(m):
            b[i * m + j] = rhs[i + 1, j + 1]
    x = np.zeros(n)
    r = b.copy()
    z = np.empty(n)
    q = np.empty(n)
    _ic0_apply(d, west, south, m, r, z)
    pvec = z.copy()
    rz = 0.0
    bb = 0.0
    for p in range(n):
        rz += r[p] * z[p]
        bb += b[p] * b[p]
    tol2 = rtol * rtol * bb
    its = -1
    for it in range(maxiter):
        rr = 0.0
        for p in range(n):
            rr += r[p] * r[p]
        if rr <= tol2:
            its = it
            break
        _stencil_apply(diag, west, south, m, pvec, q)
        pq = 0.0
        for p in range(n):
            pq += pvec[p] * q[p]
        alpha = rz / pq
        for p in range(n):
            x[p] += alpha * pvec[p]
            r[p] -= alpha * q[p]
        _ic0_apply(d, west, south, m, r, z)
        rz_new = 0.0
        for p in range(n):
            rz_new += r[p] * z[p]
        beta = rz_new / rz
        rz = rz_new
        for p in range(n):
            pvec[p] = z[p] + beta * pvec[p]
    u = np.zeros((G, G))
    for i in range(m):
        for j in range(m):
            u[i + 1, j + 1] = x[i * m + j]
    return u, its


@njit(cache=True)
def _heat_factor(m, r):
    """Band Cholesky factor of I + (r/2) K, K = h^2 (-lap_h) the 5-point Dirichlet Laplacian on the
    m x m interior nodes, r = kappa dt / h^2 (Crank-Nicolson's left-hand side)."""
    n = m * m
    L = np.zeros((n, m + 1))
    for p in range(n):
        L[p, m] = 1.0 + 2.0 * r
        if p % m != 0:
            L[p, m - 1] = -0.5 * r
        if p >= m:
            L[p, 0] = -0.5 * r
    _band_cholesky(L, m)
    return L


@njit(cache=True)
def _heat_cn(L, u0, r, steps):
    """Crank-Nicolson: `steps` steps of (I + r/2 K) u' = (I - r/2 K) u from u0 (G, G), zero boundary."""
    G = u0.shape[0]
    m = G - 2
    u = np.zeros((G, G))
    b = np.empty(m * m)
    for i in range(1, G - 1):
        for j in range(1, G - 1):
            u[i, j] = u0[i, j]
    for _ in range(steps):
        for i in range(1, G - 1):
            for j in range(1, G - 1):
                lap = 4.0 * u[i, j] - u[i - 1, j] - u[i + 1, j] - u[i, j - 1] - u[i, j + 1]
                b[(i - 1) * m + (j - 1)] = u[i, j] - 0.5 * r * lap
        _band_solve(L, m, b)
        for i in range(m):
            for j in range(m):
                u[i + 1, j + 1] = b[i * m + j]
    return u


@njit(cache=True)
def _vanleer(a, b):
    if a * b <= 0.0:
        return 0.0
    return 2.0 * a * b / (a + b)


@njit(cache=True)
def _burgers_rhs(u, nu, h, muscl, out):
    """-(F_{i+1/2} - F_{i-1/2}) / h + nu (u_{i+1} - 2 u_i + u_{i-1}) / h^2, periodic; F the Rusanov flux
    of the left/right states, piecewise constant or MUSCL (van Leer limited slopes)."""
    G = u.shape[0]
    for i in range(G + 1):  # face i-1/2 between cells i-1 and i (mod G); out[i] accumulates
        il = (i - 1) % G
        ir = i % G
        ul = u[il]
        ur = u[ir]
        if muscl:
            ul += 0.5 * _vanleer(u[il] - u[(il - 1) % G], u[ir] - u[il])
            ur -= 0.5 * _vanleer(u[ir] - u[il], u[(ir + 1) % G] - u[ir])
        s = max(abs(ul), abs(ur))
        f = 0.25 * (ul * ul + ur * ur) - 0.5 * s * (ur - ul)
        if i < G:
            out[i] = f / h
        if i > 0:
            out[i - 1] -= f / h
    c = nu / (h * h)
    for i in range(G):
        out[i] += c * (u[(i + 1) % G] - 2.0 * u[i] + u[(i - 1) % G])


@njit(cache=True)
def _burgers(u0, nu, T, cfl, muscl):
    """Finite volumes, SSP-RK2 (Heun), dt = cfl / (max|u| / h + 2 nu / h^2), the last step cut to end at
    T. Returns (u(T), steps)."""
    G = u0.shape[0]
    h = 1.0 / G
    u = u0.copy()
    k1 = np.empty(G)
    k2 = np.empty(G)
    u1 = np.empty(G)
    t = 0.0
    steps = 0
    while t < T:
        umax = 0.0
        for i in range(G):
            umax = max(umax, abs(u[i]))
        dt = cfl / (umax / h + 2.0 * nu / (h * h) + 1e-300)
        if t + dt >= T:
            dt = T - t
            t = T
        else:
            t += dt
        _burgers_rhs(u, nu, h, muscl, k1)
        for i in range(G):
            u1[i] = u[i] + dt * k1[i]
        _burgers_rhs(u1, nu, h, muscl, k2)
        for i in range(G):
            u[i] = 0.5 * (u[i] + u1[i] + dt * k2[i])
        steps += 1
    return u, steps


# ---------------------------------------------------------------------------------------------------
# Solvers (float64 in, float64 out) and samples


def solve_darcy(a: np.ndarray, f: np.ndarray | float = 1.0, solver: str = "cholesky") -> np.ndarray:
    """u (G, G) on the nodes x_i = i/(G-1) (index [i, j] = (x_i, y_j)), u = 0 on the boundary, of
    -div(a grad u) = f, a and f given at the nodes: the 5-point finite-volume scheme with harmonic face
    coefficients, solved exactly (banded Cholesky) or by IC(0)-PCG to a residual of 1e-12."""
    a = np.ascontiguousarray(a, dtype=np.float64)
    G = a.shape[0]
    if a.ndim != 2 or a.shape[1] != G or G < 3:
        raise ConfigError(f"darcy2d: the coefficient must be square, at least 3 x 3 (got {a.shape})")
    rhs = np.ascontiguousarray(np.broadcast_to(np.asarray(f, dtype=np.float64), a.shape)) / (G - 1) ** 2
    if solver == "cholesky":
        u = _darcy_cholesky(a, rhs)
    elif solver == "pcg":
        u, its = _darcy_pcg(a, rhs, PCG_RTOL, 20 * G + 100)
        if its < 0:
            raise DataError(f"darcy2d: PCG did not converge in {20 * G + 100} iterations")
    else:
        raise ConfigError(f"darcy2d: solver must be cholesky or pcg (got {solver!r})")
    if not np.isfinite(u).all():
        raise DataError("darcy2d: the coefficient does not give a positive definite system")
    return u


@functools.lru_cache(maxsize=4)
def _heat_factor_cached(m: int, r: float) -> np.ndarray:
    L = _heat_factor(m, r)
    L.setflags(write=False)
    return L


def solve_heat(u0: np.ndarray, kappa: float, T: float, steps: int) -> np.ndarray:
    """u(T) of u_t = kappa lap u on the unit square, u = 0 on the boundary, from u0 on the G x G nodes:
    5-point Laplacian, Crank-Nicolson with `steps` equal steps, each one banded Cholesky solve (the
    factor is computed once per (G, kappa dt / h^2))."""
    u0 = np.ascontiguousarray(u0, dtype=np.float64)
    G = u0.shape[0]
    r = kappa * (T / steps) * (G - 1) ** 2
    return _heat_cn(_heat_factor_cached(G - 2, float(r)), u0, r, int(steps))


def solve_burgers(u0: np.ndarray, nu: float, T: float, cfl: float = 0.4, scheme: str = "muscl") -> np.ndarray:
    """u(T) of u_t + (u^2/2)_x = nu u_xx on [0,1) periodic, u0 the averages over the G cells
    [j h, (j+1) h) (or the values at their centres, equal to O(h^2)): Rusanov flux of piecewise constant
    (first order) or MUSCL van-Leer-limited (second order) states, central diffusion, SSP-RK2."""
    u0 = np.ascontiguousarray(u0, dtype=np.float64)
    return _burgers(u0, float(nu), float(T), float(cfl), scheme == "muscl")[0]


def sample(problem: str, index: int, grid: int, seed: int = 0, split: str = "train",
           **params) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of the split: (x, y) as float32, shapes as `shapes(problem, grid)`."""
    p = resolve_params(problem, grid, params)
    return _sample(problem, index, grid, seed, split, p)


def _sample(problem, index, grid, seed, split, p):
    rng = stream(seed, index, split)
    r = p["refine"]
    fine = solver_grid(problem, grid, r)
    if problem == "darcy2d":
        psi = grf2d(rng, fine, p["alpha"], p["tau"], p["sigma"], "cos", p["modes"])
        if p["coefficient"] == "threshold":
            a = np.where(psi >= 0.0, p["a_high"], p["a_low"])
        else:
            a = np.exp(psi)
        x, y = a, solve_darcy(a, p["forcing"], p["solver"])
    elif problem == "heat2d":
        x = grf2d(rng, fine, p["alpha"], p["tau"], p["sigma"], "sin", p["modes"])
        y = solve_heat(x, p["kappa"], p["T"], p["steps"])
    else:  # the stored cells' averages of the fine cells' values
        x = grf1d_periodic(rng, fine, p["alpha"], p["tau"], p["sigma"], p["modes"])
        y = solve_burgers(x, p["nu"], p["T"], p["cfl"], p["scheme"])
        return (x.reshape(grid, r).mean(axis=1).astype(np.float32),
                y.reshape(grid, r).mean(axis=1).astype(np.float32))
    return x[None, ::r, ::r].astype(np.float32), y[::r, ::r].astype(np.float32)  # every r-th node


def generate(problem: str, start: int, stop: int, grid: int, seed: int = 0, split: str = "train",
             **params) -> tuple[np.ndarray, np.ndarray]:
    """Samples start..stop-1 of the split stacked: x (n, *input_shape), y (n, *target_shape), float32;
    row k equals sample(problem, start + k, ...)."""
    p = resolve_params(problem, grid, params)
    return _generate(problem, start, stop, grid, seed, split, p)


def _generate(problem, start, stop, grid, seed, split, p):
    ins, outs = shapes(problem, grid)
    x = np.empty((stop - start, *ins), np.float32)
    y = np.empty((stop - start, *outs), np.float32)
    for k in range(stop - start):
        x[k], y[k] = _sample(problem, start + k, grid, seed, split, p)
    return x, y


# ---------------------------------------------------------------------------------------------------
# Accuracy: manufactured / exact solutions on three grids


def _order(spacings, errors) -> float:
    """Least-squares slope of log(error) against log(h)."""
    h = np.asarray(spacings, dtype=np.float64)
    return float(np.polyfit(np.log(h), np.log(np.asarray(errors)), 1)[0])


def _darcy_error(G: int) -> float:
    """u = sin(pi x) sin(2 pi y), a = 1 + 0.5 sin(2 pi x + 0.3) cos(2 pi y) (smooth, 0.5 <= a <= 1.5),
    f = -div(a grad u): max nodal error."""
    x = np.linspace(0.0, 1.0, G)
    X, Y = np.meshgrid(x, x, indexing="ij")
    pi = math.pi
    a = 1.0 + 0.5 * np.sin(2 * pi * X + 0.3) * np.cos(2 * pi * Y)
    ax = pi * np.cos(2 * pi * X + 0.3) * np.cos(2 * pi * Y)
    ay = -pi * np.sin(2 * pi * X + 0.3) * np.sin(2 * pi * Y)
    u = np.sin(pi * X) * np.sin(2 * pi * Y)
    ux = pi * np.cos(pi * X) * np.sin(2 * pi * Y)
    uy = 2 * pi * np.sin(pi * X) * np.cos(2 * pi * Y)
    lap = -5 * pi * pi * u
    f = -(ax * ux + ay * uy + a * lap)
    return float(np.abs(solve_darcy(a, f, "cholesky") - u).max())


def _heat_error(G: int) -> float:
    """The eigenmode sin(pi x) sin(2 pi y) decays as exp(-5 pi^2 kappa t); kappa = 0.1, T = 0.2,
    steps = G-1: max nodal error at T."""
    x = np.linspace(0.0, 1.0, G)
    X, Y = np.meshgrid(x, x, indexing="ij")
    mode = np.sin(math.pi * X) * np.sin(2 * math.pi * Y)
    kappa, T = 0.1, 0.2
    u = solve_heat(mode, kappa, T, G - 1)
    return float(np.abs(u - mode * math.exp(-5 * math.pi ** 2 * kappa * T)).max())


def _cole_hopf(x, t, nu):
    """Exact viscous Burgers solution u = -2 nu phi_x / phi, phi = 1.2 + exp(-4 pi^2 nu t) cos(2 pi x)."""
    e = math.exp(-4 * math.pi ** 2 * nu * t)
    return 4 * math.pi * nu * e * np.sin(2 * math.pi * x) / (1.2 + e * np.cos(2 * math.pi * x))


def _cell_averages(fn, G):
    """Cell averages over [j h, (j+1) h) by 4-point Gauss-Legendre quadrature (error O(h^8))."""
    pts, wts = np.polynomial.legendre.leggauss(4)
    h = 1.0 / G
    left = np.arange(G) * h
    return sum(w / 2 * fn(left + (p + 1) / 2 * h) for p, w in zip(pts, wts))


def _burgers_error(G: int, scheme: str = "muscl") -> float:
    """Cole-Hopf solution, nu = 0.02, T = 0.5: L1 error of the cell averages at T."""
    nu, T = 0.02, 0.5
    u0 = _cell_averages(lambda x: _cole_hopf(x, 0.0, nu), G)
    u = solve_burgers(u0, nu, T, 0.4, scheme)
    return float(np.abs(u - _cell_averages(lambda x: _cole_hopf(x, T, nu), G)).mean())


CONVERGENCE = {  # problem -> (grids, error function, the scheme's order)
    "darcy2d": ((17, 33, 65), _darcy_error, 2.0),
    "heat2d": ((17, 33, 65), _heat_error, 2.0),
    "burgers1d": ((64, 128, 256), _burgers_error, 2.0),
}


def spacing(problem: str, grid: int) -> float:
    """The mesh width h: 1/(grid-1) on the vertex grids of the 2-D problems, 1/grid on burgers1d's cells."""
    return 1.0 / grid if problem == "burgers1d" else 1.0 / (grid - 1)


def convergence_order(problem: str) -> tuple[tuple[int, ...], list[float], float, float]:
    """(grids, errors, observed_order, expected_order) of the problem's solver on a manufactured or
    exact smooth solution (darcy2d: manufactured u and a; heat2d: a decaying eigenmode; burgers1d: the
    Cole-Hopf solution). observed_order: the least-squares slope of log(error) against log(h)."""
    if problem not in CONVERGENCE:
        raise ConfigError(f"unknown PDE problem {problem!r} (choose from {', '.join(PROBLEMS)})")
    grids, fn, expected = CONVERGENCE[problem]
    errors = [fn(g) for g in grids]
    return grids, errors, _order([spacing(problem, g) for g in grids], errors), expected


# ---------------------------------------------------------------------------------------------------
# The parallel writer


@dataclass(frozen=True)
class PdeInfo:
    path: str
    problem: str
    sizes: dict           # split -> samples
    input_shape: tuple
    target_shape: tuple
    seconds: float        # generation and writing, all ranks together (wall clock)
    ranks: int
    solve_seconds: float = 0.0  # generating the samples (random fields + solves), summed over the ranks
    write_seconds: float = 0.0  # HDF5 create, writes, close (+ rank 0's fsync): the slowest rank


def file_attrs(problem: str, grid: int, seed: int, samples: int, test_fraction: float, p: dict,
               chunk_samples: int, compression: int | None) -> dict:
    """The file's root attributes: nothing in them depends on the rank count or the time."""
    from .. import __version__

    ins, outs = shapes(problem, grid)
    attrs = dict(name=problem, problem=problem, task="regression", features=int(np.prod(ins)),
                 format_version=FORMAT_VERSION,
                 generator="hpcopt.data.pde", hpcopt_version=__version__, grid=grid, seed=seed,
                 samples=samples, test_fraction=float(test_fraction), input_shape=np.array(ins, np.int64),
                 target_shape=np.array(outs, np.int64), chunk_samples=chunk_samples,
                 compression=f"gzip-{compression}" if compression is not None else "none",
                 random_stream="numpy Philox key (seed, j) for train sample j, (seed, 2**63 + j) for test "
                               "sample j")
    if problem == "darcy2d":
        attrs.update(equation="-div(a grad u) = f on (0,1)^2, u = 0 on the boundary",
                     grid_kind="vertex: x_i = i/(grid-1), boundary included, index [i, j] = (x_i, y_j)",
                     input="a", target="u",
                     discretisation="5-point finite volume, harmonic face coefficients, "
                                    + ("banded Cholesky" if p["solver"] == "cholesky" else "IC(0)-PCG rtol 1e-12"),
                     coefficient_field="Neumann GRF N(0, sigma^2 (-lap + tau^2)^-alpha), mean mode removed")
    elif problem == "heat2d":
        attrs.update(equation="u_t = kappa lap u on (0,1)^2, u = 0 on the boundary (Dirichlet)",
                     grid_kind="vertex: x_i = i/(grid-1), boundary included, index [i, j] = (x_i, y_j)",
                     input="u(0)", target="u(T)", boundary="dirichlet",
                     discretisation="5-point Laplacian, Crank-Nicolson, banded Cholesky",
                     initial_field="Dirichlet GRF N(0, sigma^2 (-lap + tau^2)^-alpha)")
    else:
        attrs.update(equation="u_t + (u^2/2)_x = nu u_xx on [0,1) periodic",
                     grid_kind="cells [j/grid, (j+1)/grid): field values at the centres (j+1/2)/grid, "
                               "solution cell averages",
                     input="u(0)", target="u(T)", boundary="periodic",
                     discretisation=("MUSCL (van Leer) " if p["scheme"] == "muscl" else "first-order ")
                                    + "Rusanov finite volume, central diffusion, SSP-RK2, adaptive dt",
                     initial_field="periodic GRF N(0, sigma^2 (-d_xx + tau^2)^-alpha), zero mean")
    attrs.update(p)  # the problem's parameters, each under its own name (resolve_params' values)
    attrs["parameters"] = ",".join(p)
    return attrs


PIECE = 16  # samples: the unit of work handed out, and of the /stats partial sums


def _pieces(sizes: dict, chunk_samples: int) -> list[tuple[str, int, int]]:
    """The file's samples as (split, lo, hi) pieces of at most PIECE samples that never cross an HDF5
    chunk, the train split's then the test split's: a partition that does not depend on the ranks."""
    return [(split, lo, min(c + chunk_samples, sizes[split], lo + PIECE))
            for split in SPLITS for c in range(0, sizes[split], chunk_samples)
            for lo in range(c, min(c + chunk_samples, sizes[split]), PIECE)]


class _Counter:
    """Hands out work units 0, 1, 2, ... to whichever rank asks first: an MPI-3 atomic fetch-and-add on
    an integer in rank 0's window (passive target: rank 0 need not be in MPI to answer). Where the MPI
    library offers no such window, each rank takes a fixed contiguous ~1/P of the units instead."""

    def __init__(self, comm, n: int):
        from mpi4py import MPI

        self.n, self.win, self.static = n, None, None
        try:
            self.win = MPI.Win.Allocate(8 if comm.Get_rank() == 0 else 0, 8, comm=comm)
        except MPI.Exception:
            r, p = comm.Get_rank(), comm.Get_size()
            self.static = iter(range(n * r // p, n * (r + 1) // p))
        else:
            if comm.Get_rank() == 0:
                np.frombuffer(self.win.tomemory(), np.int64)[:] = 0
            comm.Barrier()
        self.one, self.got = np.ones(1, np.int64), np.zeros(1, np.int64)

    def next(self) -> int:
        """The next unit, or n when none is left."""
        if self.static is not None:
            return next(self.static, self.n)
        from mpi4py import MPI

        self.win.Lock(0, MPI.LOCK_SHARED)
        self.win.Fetch_and_op(self.one, self.got, 0, 0, MPI.SUM)
        self.win.Unlock(0)
        return min(int(self.got[0]), self.n)

    def stop(self) -> None:
        """No unit is handed out any more, to any rank (after a failure)."""
        if self.static is not None:
            self.static = iter(())
            return
        from mpi4py import MPI

        self.win.Lock(0, MPI.LOCK_SHARED)
        self.win.Accumulate(np.array([self.n], np.int64), 0, None, MPI.SUM)
        self.win.Unlock(0)

    def free(self) -> None:
        if self.win is not None:
            self.win.Free()


def make_pde(problem: str, out: str, samples: int, grid: int, seed: int = 0, test_fraction: float = 0.2,
             comm=None, chunk_samples: int = 64, compression: int | None = None, buffer_mb: float = 256,
             **params) -> PdeInfo:
    """Generate `samples` samples (the last round(samples * test_fraction) of them the test split) and
    write them to `out` together with all ranks of `comm` (default MPI.COMM_WORLD; collective).

    Each split is cut into chunks of `chunk_samples` whole samples (the HDF5 chunks), and the chunks into
    pieces of up to PIECE samples. The ranks take units of work (a piece; with `compression`, a gzip
    level 0-9, a whole chunk) from a shared counter as they finish the last one, so a slower rank simply
    makes fewer (_produce). Uncompressed, each piece is written as soon as it is made by its rank alone;
    compressed data needs collective writes: about `buffer_mb` MiB of samples per rank (at most twice
    that) are solved in a round, then all ranks write what they hold together. The file is written as
    a hidden temporary beside `out` and renamed by rank 0 when every rank has finished; a failure on any rank raises the same DataError on
    all ranks and leaves nothing behind. The datasets, and with compression=None the whole file, are
    the same bytes for any number of ranks."""
    import h5py
    from mpi4py import MPI

    from ..checkpoint import parallel_hdf5
    from ..ckptfile import fsync_dir, temp_name
    from .importer import target_stats

    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        p = resolve_params(problem, grid, params)
    except ConfigError as e:
        raise _everywhere(e) from None
    if not isinstance(samples, (int, np.integer)) or samples < 2:
        raise _everywhere(ConfigError(f"{problem}: samples must be an integer >= 2 (got {samples!r})"))
    if not (isinstance(test_fraction, numbers.Real) and 0.0 < test_fraction < 1.0):
        raise _everywhere(ConfigError(f"{problem}: test_fraction must be in (0, 1) (got {test_fraction})"))
    if not isinstance(chunk_samples, (int, np.integer)) or chunk_samples < 1:
        raise _everywhere(ConfigError(f"chunk_samples must be an integer >= 1 (got {chunk_samples!r})"))
    if not isinstance(buffer_mb, numbers.Real) or not buffer_mb > 0:
        raise _everywhere(ConfigError(f"buffer_mb must be a positive number of MiB (got {buffer_mb!r})"))
    if compression is not None and compression not in range(10):
        raise _everywhere(ConfigError(f"compression must be a gzip level 0-9 or None (got {compression!r})"))
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 1 << 64:
        raise _everywhere(ConfigError(f"seed must be an integer in [0, 2**64) (got {seed!r})"))
    n_test = min(samples - 1, max(1, int(round(samples * test_fraction))))
    sizes = {"train": samples - n_test, "test": n_test}
    ins, outs = shapes(problem, grid)
    attrs = file_attrs(problem, grid, int(seed), int(samples), test_fraction, p, int(chunk_samples), compression)
    mpio = parallel_hdf5()
    t0 = time.perf_counter()
    solve_s = write_s = 0.0  # this rank's time in _generate, and in HDF5 writing (PdeInfo)
    stats = []  # (piece index, sum, sum of squares, rows) of the training pieces this rank made

    tmp, failure = None, None
    if rank == 0:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            tmp = temp_name(os.path.abspath(out))
        except OSError as e:
            failure = f"cannot create its directory ({e.strerror or e})"
    tmp, failure = comm.bcast((tmp, failure))
    _agree(comm, out, None, failure)

    f = None
    tw = time.perf_counter()
    try:
        if mpio:
            f = h5py.File(tmp, "w-", driver="mpio", comm=comm)
        elif rank == 0:
            if size > 1:
                print("hpcopt: warning: h5py has no MPI support; samples gathered to rank 0 and written "
                      "serially (see README: parallel HDF5)", file=sys.stderr, flush=True)
            f = h5py.File(tmp, "w-")
    except OSError as e:
        failure = f"cannot create it ({e.strerror or e})"
    write_s += time.perf_counter() - tw
    _agree(comm, out, tmp, failure)

    try:
        tw = time.perf_counter()
        with (f if f is not None else _Null()):
            if f is not None:
                f.attrs.update(attrs)
            datasets = {}
            for split in SPLITS:  # creation is collective: every rank, same order, same arguments
                n = sizes[split]
                for part, shape in (("x", ins), ("y", outs)):
                    if f is None:
                        continue
                    kw = dict(chunks=(min(chunk_samples, n), *shape))
                    if compression is not None:
                        kw.update(compression="gzip", compression_opts=compression, shuffle=True)
                    else:
                        kw.update(fill_time="never")
                    ds = f.create_dataset(f"{split}/{part}", (n, *shape), np.float32, **kw)
                    ds.attrs.update(chunk_samples=int(chunk_samples), sample_shape=np.array(shape, np.int64))
                    datasets[split, part] = ds
            write_s += time.perf_counter() - tw
            pieces = _pieces(sizes, int(chunk_samples))

            def make(i):  # piece i's samples, and its share of /stats (summed in piece order at the end)
                split, lo, hi = pieces[i]
                x, y = _generate(problem, lo, hi, grid, seed, split, p)
                if split == "train":
                    stats.append((i, *target_stats(y)))
                return split, lo, x, y

            rounds = not mpio or compression is not None  # else each piece is written when made
            units = [[i] for i in range(len(pieces))]
            if compression is not None:  # a compressed chunk is written once: whole chunks are the units
                units = [[i for i, _ in run] for _, run in itertools.groupby(
                    enumerate(pieces), key=lambda ip: (ip[1][0], ip[1][1] // chunk_samples))]
            unit_bytes = _sample_bytes(ins, outs) * max(sum(pieces[i][2] - pieces[i][1] for i in u) for u in units)
            solve, w = _produce(comm, datasets if f is not None else None, mpio, units, make,
                                max(1, int(buffer_mb * 2**20) // unit_bytes) if rounds else None)
            solve_s += solve
            write_s += w
            tw = time.perf_counter()
        write_s += time.perf_counter() - tw  # the file's close
        stats = comm.gather(stats, root=0)
        if rank == 0:
            _append_target_stats(tmp, sizes["train"], [c for part in stats for c in part])
            tw = time.perf_counter()
            with open(tmp, "rb+") as fh:  # durable before it gets its final name
                os.fsync(fh.fileno())
            write_s += time.perf_counter() - tw
    except _Failed as e:
        failure = str(e)
    except (OSError, RuntimeError, ValueError) as e:
        failure = f"{type(e).__name__}: {e}"
    _agree(comm, out, tmp, failure)
    if rank == 0:
        try:
            os.replace(tmp, out)
            fsync_dir(os.path.dirname(os.path.abspath(out)))
        except OSError as e:
            failure = f"cannot rename its temporary file ({e.strerror or e})"
    _agree(comm, out, tmp, comm.bcast(failure))
    times = comm.allgather((time.perf_counter() - t0, solve_s, write_s))
    return PdeInfo(out, problem, sizes, ins, outs, max(t[0] for t in times), size,
                   solve_seconds=sum(t[1] for t in times), write_seconds=max(t[2] for t in times))


def _produce(comm, datasets, mpio: bool, units: list, make, per_round: int | None) -> tuple[float, float]:
    """Solve the work units (lists of pieces) handed out by a _Counter and write them: with per_round
    None, each piece as soon as it is made, by an independent write of its contiguous rows (no rank
    waits for another until the end); else in rounds of about per_round units per rank (at most twice
    that), each ended by one collective write per dataset - or, without parallel HDF5, by a gather to
    rank 0, which writes. A failure stops the counter, so every rank stops taking work, and raises the
    same _Failed on all ranks. Returns this rank's seconds solving and writing."""
    from h5py import h5fd, h5p

    rank, size, n = comm.Get_rank(), comm.Get_size(), len(units)
    solve_s = write_s = 0.0
    if per_round is None:
        independent = h5p.create(h5p.DATASET_XFER)
        independent.set_dxpl_mpio(h5fd.MPIO_INDEPENDENT)
    counter = _Counter(comm, n)
    span = (per_round or 1) * size  # round k: the units [k span, (k+1) span), handed out as asked for
    try:
        pending, k = counter.next(), 0
        while True:
            got, err = [], None
            while pending < n and (per_round is None or (pending < (k + 1) * span and len(got) < 2 * per_round)):
                for i in units[pending]:
                    ts = time.perf_counter()
                    try:
                        piece = make(i)
                    except Exception as e:  # noqa: BLE001 - reported on every rank below
                        err = f"sample generation failed on rank {rank}: {type(e).__name__}: {e}"
                        break
                    finally:
                        solve_s += time.perf_counter() - ts
                    if per_round is None:  # written now, from this rank alone
                        tw = time.perf_counter()
                        for j, name in enumerate(("x", "y")):
                            _write_rows(datasets[piece[0], name], [(piece[1], piece[2 + j])], independent)
                        write_s += time.perf_counter() - tw
                    else:
                        got.append(piece)
                if err:
                    counter.stop()
                    break
                pending = counter.next()
            flags = comm.allgather((err, pending >= n))
            errors = [e for e, _ in flags if e]
            if errors:
                raise _Failed(errors[0])
            tw = time.perf_counter()
            for split in SPLITS if per_round else ():
                mine = sorted((g for g in got if g[0] == split), key=lambda g: g[1])
                if mpio:
                    for j, name in enumerate(("x", "y")):
                        _write_rows(datasets[split, name], [(g[1], g[2 + j]) for g in mine])
                else:
                    for blk in comm.gather([g[1:] for g in mine], root=0):
                        for lo, x, y in blk if rank == 0 else ():
                            datasets[split, "x"][lo:lo + len(x)] = x
                            datasets[split, "y"][lo:lo + len(y)] = y
            write_s += time.perf_counter() - tw
            if all(done for _, done in flags):
                return solve_s, write_s
            k += 1
    finally:
        counter.free()


def _sample_bytes(ins: tuple, outs: tuple) -> int:
    return 4 * (int(np.prod(ins)) + int(np.prod(outs)))


def _append_target_stats(path: str, n: int, parts: list) -> None:
    """/stats/y_mean and /stats/y_std of the training targets (what data.normalize_targets trains
    against; `hpcopt data stats` format) from every training piece's (index, sum, sum of squares, rows),
    summed in piece order, so the statistics are the same bits whatever the number of ranks that made
    them."""
    import h5py

    from .importer import write_stats

    s = q = None
    for _, ds, dq, _ in sorted(parts, key=lambda c: c[0]):
        s, q = (ds, dq) if s is None else (s + ds, q + dq)
    assert sum(c[3] for c in parts) == n
    with h5py.File(path, "a") as f:
        write_stats(f, s, q, n)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _Failed(Exception):
    pass


def _everywhere(e):
    e.all_ranks = True  # every rank checks the same arguments and raises alike
    return e


def _agree(comm, out: str, tmp: str | None, failure: str | None) -> None:
    """Every rank learns whether any failed; then the temporary file goes and all raise alike."""
    failures = [f for f in comm.allgather(failure) if f]
    if failures:
        if comm.Get_rank() == 0 and tmp and os.path.lexists(tmp):
            os.remove(tmp)
        raise _everywhere(DataError(f"{out}: cannot write the data set ({failures[0]}); nothing written"))


def _write_rows(ds, blocks: list, dxpl=None) -> None:
    """Write blocks [(lo, rows), ...] (ascending lo) of ds as one selection: collectively unless dxpl
    says otherwise. In a collective write a rank with nothing to write still takes part with an explicit
    empty selection: every rank must call H5Dwrite, or the others wait forever."""
    from h5py import h5fd, h5p, h5s

    if dxpl is None:
        dxpl = h5p.create(h5p.DATASET_XFER)
        dxpl.set_dxpl_mpio(h5fd.MPIO_COLLECTIVE)
    fspace = ds.id.get_space()
    if not blocks:
        buf = np.zeros((1, *ds.shape[1:]), np.float32)
        mspace = h5s.create_simple(buf.shape)
        mspace.select_none()
        fspace.select_none()
    else:  # the selection's elements go in file order: the blocks ascending, rows concatenated alike
        buf = np.ascontiguousarray(np.concatenate([rows for _, rows in blocks]), dtype=np.float32)
        mspace = h5s.create_simple(buf.shape)
        fspace.select_none()
        for lo, rows in blocks:
            fspace.select_hyperslab((lo,) + (0,) * (buf.ndim - 1), rows.shape, op=h5s.SELECT_OR)
    ds.id.write(mspace, fspace, buf, dxpl=dxpl)


# ---------------------------------------------------------------------------------------------------
# Command line


def params_from_args(problem: str, args: argparse.Namespace) -> dict:
    """The problem's parameters given on the command line (the others keep their defaults)."""
    return {k: getattr(args, k) for k in DEFAULTS[problem] if getattr(args, k, None) is not None}


def run_from_args(args: argparse.Namespace, problem: str | None = None) -> PdeInfo:
    problem = problem or args.name
    return make_pde(problem, args.out, args.samples, args.grid, seed=args.seed, test_fraction=args.test_fraction,
                    chunk_samples=args.chunk_samples, compression=args.compression, buffer_mb=args.buffer_mb,
                    **params_from_args(problem, args))
