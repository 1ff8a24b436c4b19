"""Full-batch multinomial logistic regression on precomputed features (the small-data probe).

METHODS.md §7 allows precomputed features and full-batch training for small data sets. We fit

  f(W, b) = (1/N) sum_i CE(softmax(x_i W + b), y_i) + (l2 / 2) ||W||_F^2       (bias not penalised)

on standardised features with L-BFGS (`optax.lbfgs`, zoom line search) inside one
`jax.lax.while_loop`, so a whole fit is a single compiled call. The problem is strictly convex
for l2 > 0: the solution is unique and the optimality condition is

  grad_W = X^T (P - Y) / N + l2 W = 0,   grad_b = sum_i (p_i - y_i) / N = 0,

which tests check directly. sklearn's `LogisticRegression(C=...)` minimises
C sum_i CE + ||W||^2 / 2, the same problem with l2 = 1 / (C N).

The L2 strength is chosen on a held-out part of the train split (`select_l2`), never on test:
every grid value is fitted at once (vmapped: one pass over X per iteration for the whole grid),
then the chosen value is refitted on the whole train split.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

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


def objective(params, x, y, l2):
  """Mean cross-entropy + (l2 / 2) ||W||^2; y int labels (N,)."""
  logits = logits_fn(params, x)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return ce + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fit(x, y, l2, init, tol, *, max_iter: int):
  """L-BFGS until ||grad||_2 < tol or max_iter iterations; returns (params, iterations, gnorm)."""
  fun = lambda p: objective(p, x, y, l2)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    gnorm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (gnorm >= tol))

  params, state = jax.lax.while_loop(keep_going, step, (init, solver.init(init)))
  gnorm = otu.tree_norm(jax.grad(fun)(params))
  return params, otu.tree_get(state, "count"), gnorm


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


def fit_logistic(x, y, *, num_classes: int, l2: float, max_iter: int = 500, tol: float = 1e-5,
                 init=None) -> tuple[dict, dict]:
  """Fits one multinomial logistic regression; returns ({"w", "b"} NumPy, info).

  `x` should be standardised (`Standardizer`): L-BFGS then converges in tens to hundreds of
  iterations. `tol` is on the gradient's L2 norm. info: {"iterations", "grad_norm", "converged"}.
  """
  x, y = _check(x, y, num_classes)
  init = _zeros(x.shape[1], num_classes) if init is None else init
  params, count, gnorm = _fit(jnp.asarray(x), jnp.asarray(y), jnp.float32(l2), init,
                              jnp.float32(tol), max_iter=int(max_iter))
  gnorm = float(gnorm)
  return jax.tree.map(np.asarray, params), {"iterations": int(count), "grad_norm": gnorm,
                                             "converged": bool(gnorm < tol)}


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fit_grid(x, y, l2s, init, tol, *, max_iter: int):
  """`_fit` vmapped over the L2 grid: one matmul per iteration serves every grid value."""
  return jax.vmap(lambda l2: _fit.__wrapped__(x, y, l2, init, tol, max_iter=max_iter))(l2s)


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
              max_iter: int = 500, tol: float = 1e-5) -> dict:
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
  params, counts, _ = _fit_grid(jnp.asarray(xf), jnp.asarray(y[fit_rows]),
                                jnp.asarray(grid, jnp.float32), _zeros(x.shape[1], num_classes),
                                jnp.float32(tol), max_iter=int(max_iter))
  scores = np.asarray(_grid_logits_jit(params, jnp.asarray(xh)))
  accs = [accuracy(s, y[held_rows]) for s in scores]
  best = int(np.argmax(accs))  # First maximum = largest L2 among ties.
  return {"l2": grid[best], "held_out_top1": accs[best], "held_out_size": int(held_rows.size),
          "grid": [{"l2": l, "held_out_top1": a, "iterations": int(c)}
                   for l, a, c in zip(grid, accs, np.asarray(counts))]}
