"""Full-batch multinomial logistic regression on precomputed features (the small-data probe).

METHODS.md §7 allows precomputed features and full-batch training for small data sets. We fit

  f(W, b) = (1/N) sum_i CE(softmax(x_i W + b), y_i) + (l2 / 2) ||W||_F^2       (bias not penalised)

on standardised features with L-BFGS (two-loop recursion, Armijo backtracking) inside one
`jax.lax.while_loop`, so a whole fit is a single compiled call. The problem is strictly convex
for l2 > 0: the solution is unique and the optimality condition is

  grad_W = X^T (P - Y) / N + l2 W = 0,   grad_b = sum_i (p_i - y_i) / N = 0,

which tests check directly. sklearn's `LogisticRegression(C=...)` minimises
C sum_i CE + ||W||^2 / 2, the same problem with l2 = 1 / (C N).

The L2 strength is chosen on a held-out part of the train split (`select_l2`), never on test:
every grid value is fitted at once (one pass over X per iteration for the whole grid), then the
chosen value is refitted on the whole train split, warm-started from its held-out fit.

Cost on Fashion-MNIST-shaped features (60,000 x 512, 10 classes, 5 L2 values, 100 iterations;
benchmarks/bench_eval.py, 2 shared CPU cores): choice 19 s CPU, refit 7 s CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Standardizer:
  """x -> (x - mean) / std with train statistics; constant features keep scale 1 (std -> 1)."""
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(cls, x: np.ndarray, eps: float = 1e-6) -> "Standardizer":
    x64 = np.asarray(x, np.float64)
    mean, std = x64.mean(axis=0), x64.std(axis=0)
    std = np.where(std > eps, std, 1.0)
    return cls(mean.astype(np.float32), std.astype(np.float32))

  def __call__(self, x) -> np.ndarray:
    return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)


def logits_fn(params, x):
  """x (N, D) @ W (D, C) + b at HIGHEST precision (TPU/GPU defaults round to ~3 digits)."""
  return jnp.dot(x, params["w"], precision=HIGHEST) + params["b"]


def _grid_value_and_grad(theta, x, xt, y, l2s, dim: int, num_classes: int):
  """Objectives (G,) and gradients (G, D*C + C) of G problems sharing (x, y); theta (G, P).

  One (N, D) @ (D, G*C) product gives every member's logits and one (D, N) @ (N, G*C) product
  every member's weight gradient X^T (P - Y) / N (+ l2 W): the cost is dominated by reading x,
  so G L2 values cost little more than one. `xt` is x transposed and stored: XLA's CPU product
  with x's first axis contracted is ~3x slower than a plain product with a stored transpose.
  """
  g, n = theta.shape[0], x.shape[0]
  w = theta[:, :dim * num_classes].reshape(g, dim, num_classes)
  b = theta[:, dim * num_classes:]
  w_cat = jnp.transpose(w, (1, 0, 2)).reshape(dim, g * num_classes)
  logits = jnp.dot(x, w_cat, precision=HIGHEST).reshape(n, g, num_classes) + b[None]
  logp = jax.nn.log_softmax(logits, axis=-1)
  one_hot = jax.nn.one_hot(y, num_classes, dtype=logp.dtype)[:, None, :]
  ce = -jnp.sum(logp * one_hot, axis=(0, 2)) / n
  values = ce + 0.5 * l2s * jnp.sum(jnp.square(w), axis=(1, 2))
  residual = ((jnp.exp(logp) - one_hot) / n).reshape(n, g * num_classes)
  grad_w = jnp.dot(xt, residual, precision=HIGHEST).reshape(dim, g, num_classes)
  grad_w = jnp.transpose(grad_w, (1, 0, 2)) + l2s[:, None, None] * w
  grad_b = residual.sum(axis=0).reshape(g, num_classes)
  return values, jnp.concatenate([grad_w.reshape(g, -1), grad_b], axis=1)


@functools.partial(jax.jit, static_argnames=("max_iter", "memory", "dim", "num_classes"))
def _lbfgs_grid(x, xt, y, l2s, theta0, tol, *, max_iter: int, dim: int, num_classes: int,
                memory: int = 10):
  """L-BFGS on G independent problems at once (two-loop recursion per member, Armijo
  backtracking from the unit step); members stop at ||grad||_2 < tol or after max_iter.

  Written out rather than `jax.vmap(optax.lbfgs)`: under vmap the zoom line search's branches
  all run for every member, which made a 5-value grid on 60k x 512 features take minutes; here
  one iteration is one value-and-gradient pass over x for the whole grid (plus rare
  backtracking passes).
  """
  def value_and_grad(theta):
    return _grid_value_and_grad(theta, x, xt, y, l2s, dim, num_classes)

  rowdot = lambda a, b: jnp.sum(a * b, axis=-1)
  g_count, p = theta0.shape
  f0, g0 = value_and_grad(theta0)
  init = dict(theta=theta0, f=f0, g=g0, s=jnp.zeros((memory, g_count, p)),
              yy=jnp.zeros((memory, g_count, p)), rho=jnp.zeros((memory, g_count)),
              k=jnp.zeros((), jnp.int32), iters=jnp.zeros((g_count,), jnp.int32))

  def direction(st):
    q = st["g"]
    alphas = []
    for i in range(memory):   # newest to oldest
      j = (st["k"] - 1 - i) % memory
      a = st["rho"][j] * rowdot(st["s"][j], q)
      q = q - a[:, None] * st["yy"][j]
      alphas.append((j, a))
    newest = (st["k"] - 1) % memory
    sy, yy = rowdot(st["s"][newest], st["yy"][newest]), rowdot(st["yy"][newest],
                                                                   st["yy"][newest])
    gamma = jnp.where((st["rho"][newest] > 0) & (yy > 0), sy / jnp.maximum(yy, 1e-30),
                      1.0 / jnp.maximum(jnp.linalg.norm(st["g"], axis=-1), 1.0))
    r = gamma[:, None] * q
    for j, a in reversed(alphas):   # oldest to newest
      bb = st["rho"][j] * rowdot(st["yy"][j], r)
      r = r + (a - bb)[:, None] * st["s"][j]
    d = -r
    descent = rowdot(d, st["g"]) < 0
    return jnp.where(descent[:, None], d, -st["g"])

  def active(st):
    return jnp.linalg.norm(st["g"], axis=-1) >= tol

  def body(st):
    act = active(st)
    d = jnp.where(act[:, None], direction(st), 0.0)
    slope = rowdot(st["g"], d)

    def try_step(t):
      theta = st["theta"] + t[:, None] * d
      f, g = value_and_grad(theta)
      return theta, f, g

    t = jnp.ones((g_count,))
    theta, f, g = try_step(t)
    ok = (f <= st["f"] + 1e-4 * t * slope) | ~act

    def backtrack(carry):
      t, theta, f, g, ok, n = carry
      t = jnp.where(ok, t, 0.5 * t)
      theta2, f2, g2 = try_step(t)
      keep = ok[:, None]
      theta, g = jnp.where(keep, theta, theta2), jnp.where(keep, g, g2)
      f = jnp.where(ok, f, f2)
      ok = ok | (f2 <= st["f"] + 1e-4 * t * slope)
      return t, theta, f, g, ok, n + 1

    t, theta, f, g, ok, _ = jax.lax.while_loop(
        lambda c: ~jnp.all(c[4]) & (c[5] < 30), backtrack, (t, theta, f, g, ok, 0))
    # A member whose line search failed keeps its point (it will stop at max_iter).
    theta = jnp.where(ok[:, None], theta, st["theta"])
    f = jnp.where(ok, f, st["f"])
    g = jnp.where(ok[:, None], g, st["g"])
    s, yv = theta - st["theta"], g - st["g"]
    sy = rowdot(s, yv)
    slot = st["k"] % memory
    store = act & ok & (sy > 1e-10)
    rho = jnp.where(store, 1.0 / jnp.where(store, sy, 1.0), 0.0)
    return dict(theta=theta, f=f, g=g, s=st["s"].at[slot].set(s),
                yy=st["yy"].at[slot].set(yv), rho=st["rho"].at[slot].set(rho), k=st["k"] + 1,
                iters=st["iters"] + act.astype(jnp.int32))

  st = jax.lax.while_loop(lambda st: jnp.any(active(st)) & (st["k"] < max_iter), body, init)
  return st["theta"], st["iters"], jnp.linalg.norm(st["g"], axis=-1)


def _split(theta, dim, num_classes):
  w = theta[..., :dim * num_classes].reshape(theta.shape[:-1] + (dim, num_classes))
  return {"w": w, "b": theta[..., dim * num_classes:]}


def _flat(params):
  return jnp.concatenate([params["w"].reshape(-1), params["b"].reshape(-1)])


def _zeros(dim: int, num_classes: int):
  return {"w": jnp.zeros((dim, num_classes), jnp.float32), "b": jnp.zeros((num_classes,),
                                                                          jnp.float32)}


def _check(x, y, num_classes):
  x, y = np.asarray(x, np.float32), np.asarray(y)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f"features must be (N, D) and labels (N,), got {x.shape} and {y.shape}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"labels must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
  return x, y.astype(np.int32)


def fit_logistic_grid(x, y, *, num_classes: int, l2s, max_iter: int = 200, tol: float = 1e-4,
                      init=None):
  """One fit per value of `l2s` (all at once); returns ({"w" (G, D, C), "b" (G, C)} NumPy,
  iterations (G,), gradient norms (G,))."""
  x, y = _check(x, y, num_classes)
  dim = x.shape[1]
  l2s = jnp.asarray(l2s, jnp.float32).reshape(-1)
  init = _zeros(dim, num_classes) if init is None else init
  theta0 = jnp.broadcast_to(_flat(jax.tree.map(jnp.asarray, init)), (l2s.shape[0],
                                                                      dim * num_classes +
                                                                      num_classes))
  # x^T stored as its own array (see `_grid_value_and_grad`).
  theta, iters, gnorm = _lbfgs_grid(jnp.asarray(x), jnp.asarray(np.ascontiguousarray(x.T)),
                                    jnp.asarray(y), l2s, theta0,
                                    jnp.float32(tol), max_iter=int(max_iter), dim=dim,
                                    num_classes=num_classes)
  return (jax.tree.map(np.asarray, _split(theta, dim, num_classes)), np.asarray(iters),
          np.asarray(gnorm))


def fit_logistic(x, y, *, num_classes: int, l2: float, max_iter: int = 200, tol: float = 1e-4,
                 init=None) -> tuple[dict, dict]:
  """Fits one multinomial logistic regression; returns ({"w", "b"} NumPy, info).

  `x` should be standardised (`Standardizer`): L-BFGS then converges in tens to hundreds of
  iterations. `tol` is on the gradient's L2 norm. info: {"iterations", "grad_norm", "converged"}.
  """
  params, iters, gnorm = fit_logistic_grid(x, y, num_classes=num_classes, l2s=[l2],
                                           max_iter=max_iter, tol=tol, init=init)
  gnorm = float(gnorm[0])
  return jax.tree.map(lambda a: a[0], params), {"iterations": int(iters[0]), "grad_norm": gnorm,
                                                 "converged": bool(gnorm < tol)}


_logits_jit = jax.jit(logits_fn)
_grid_logits_jit = jax.jit(jax.vmap(logits_fn, in_axes=(0, None)))


def predict_scores(params, x) -> np.ndarray:
  return np.asarray(_logits_jit(params, jnp.asarray(x, jnp.float32)))


def accuracy(scores: np.ndarray, y: np.ndarray, k: int = 1) -> float:
  """Fraction of rows whose label is among the k highest scores (ties: lower class first)."""
  y = np.asarray(y)
  if y.size == 0:
    return float("nan")
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return float(np.mean((top == y[:, None]).any(axis=1)))


def split_held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit rows, held-out rows) of a seeded random permutation of the train split."""
  if not 0 < fraction < 1:
    raise ValueError(f"held_out_fraction must be in (0, 1), got {fraction}")
  n_held = max(1, int(round(n * fraction)))
  if n_held >= n:
    raise ValueError(f"held_out_fraction={fraction} leaves no training rows out of {n}")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def select_l2(x, y, *, num_classes: int, l2_grid, held_out_fraction: float = 0.1, seed: int = 0,
              max_iter: int = 200, tol: float = 1e-4) -> dict:
  """Chooses L2 on a held-out part of (x, y), the TRAIN split; test data never enters here.

  Standardisation statistics come from the fit part only. Returns {"l2", "held_out_top1",
  "grid": [{"l2", "held_out_top1", "iterations"}...]}; ties go to the larger L2 (simpler model).
  """
  x, y = _check(x, y, num_classes)
  grid = sorted({float(v) for v in l2_grid}, reverse=True)
  if not grid or min(grid) <= 0:
    raise ValueError(f"l2_grid must be non-empty positive values, got {l2_grid}")
  fit_rows, held_rows = split_held_out(x.shape[0], held_out_fraction, seed)
  std = Standardizer.fit(x[fit_rows])
  xf, xh = std(x[fit_rows]), std(x[held_rows])
  params, counts, _ = fit_logistic_grid(xf, y[fit_rows], num_classes=num_classes, l2s=grid,
                                        max_iter=max_iter, tol=tol)
  scores = np.asarray(_grid_logits_jit(params, jnp.asarray(xh)))
  accs = [accuracy(s, y[held_rows]) for s in scores]
  best = int(np.argmax(accs))  # First maximum = largest L2 among ties.
  return {"l2": grid[best], "held_out_top1": accs[best], "held_out_size": int(held_rows.size),
          "params": jax.tree.map(lambda a: a[best], params),
          "grid": [{"l2": l, "held_out_top1": a, "iterations": int(c)}
                   for l, a, c in zip(grid, accs, np.asarray(counts))]}
