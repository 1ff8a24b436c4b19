"""Full-batch probe solver (jaxcontrast/eval/logistic.py) and the held-out choice of L2.

References: the optimality condition of the regularised multinomial problem checked in NumPy
(float64), and the same objective written in NumPy (float64) minimised by SciPy's L-BFGS-B.
"""
import jax
import ml_collections
import numpy as np
import pytest

from compile_options import DEFAULT_CPU_EMITTERS
from jaxcontrast.eval import logistic
from jaxcontrast.errors import ConfigError
from jaxcontrast.eval.config import default_probe_config
from jaxcontrast.eval.linear_probe import fit_and_evaluate


def _blobs(seed, n=300, d=8, c=4, noise=2.0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(c, d)) * 1.5
  y = rng.integers(0, c, n)
  x = centres[y] + noise * rng.normal(size=(n, d))
  return x.astype(np.float32), y.astype(np.int32)


def _numpy_gradient(params, x, y, l2, c):
  x = x.astype(np.float64)
  logits = x @ params["w"].astype(np.float64) + params["b"]
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  residual = (p - np.eye(c)[y]) / len(y)
  return x.T @ residual + l2 * params["w"], residual.sum(0)


def _numpy_minimiser(x, y, l2, c):
  """argmin of (1/N) sum_i CE(softmax(x_i W + b), y_i) + (l2 / 2) ||W||^2 in float64: the
  objective in NumPy, `_numpy_gradient`, SciPy's L-BFGS-B to a tight gradient tolerance."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  x = x.astype(np.float64)
  d = x.shape[1]

  def value_and_grad(theta):
    params = {"w": theta[:d * c].reshape(d, c), "b": theta[d * c:]}
    logits = x @ params["w"] + params["b"]
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    value = -log_p[np.arange(len(y)), y].mean() + 0.5 * l2 * (params["w"] ** 2).sum()
    gw, gb = _numpy_gradient(params, x, y, l2, c)
    return value, np.concatenate([gw.ravel(), gb])

  res = optimize.minimize(value_and_grad, np.zeros(d * c + c), jac=True, method="L-BFGS-B",
                          options={"gtol": 1e-12, "ftol": 0.0, "maxiter": 10_000})
  assert np.abs(res.jac).max() < 1e-8, res.message
  return res.x[:d * c].reshape(d, c), res.x[d * c:]


def test_solution_satisfies_optimality_and_matches_an_independent_solver(monkeypatch):
  """The solver compiled as users get it: with the suite's faster CPU emitters its float32
  gradient is coarser, and it stalls at a gradient norm of 7e-5 (tests/compile_options.py)."""
  monkeypatch.setattr(logistic, "_lbfgs_grid", jax.jit(
      logistic._lbfgs_grid.__wrapped__, static_argnames=("max_iter", "memory", "dim",
                                                          "num_classes"),
      compiler_options=DEFAULT_CPU_EMITTERS))
  x, y = _blobs(0)
  x = logistic.Standardizer.fit(x)(x)
  l2 = 1e-2
  params, info = logistic.fit_logistic(x, y, num_classes=4, l2=l2, max_iter=500, tol=1e-6)
  gw, gb = _numpy_gradient(params, x, y, l2, 4)
  assert np.abs(gw).max() < 1e-5 and np.abs(gb).max() < 1e-5, info
  w_ref, b_ref = _numpy_minimiser(x, y, l2, 4)
  np.testing.assert_allclose(params["w"], w_ref, atol=2e-4)
  # Softmax is unchanged by a constant added to every bias: compare the centred biases.
  np.testing.assert_allclose(params["b"] - params["b"].mean(), b_ref - b_ref.mean(), atol=2e-4)


def test_standardizer_uses_train_statistics_and_keeps_constant_features():
  x = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
  std = logistic.Standardizer.fit(x)
  np.testing.assert_allclose(std(x), [[-1, 0], [1, 0]])
  np.testing.assert_allclose(std(np.array([[2.0, 7.0]])), [[0, 2]])


def test_held_out_choice_never_reads_test_labels():
  """Test labels chosen to favour another L2 change the reported accuracy, not the choice."""
  x, y = _blobs(1, n=400, d=30, noise=3.0)
  x_test, y_test = _blobs(2, n=200, d=30, noise=3.0)
  cfg = default_probe_config().full_batch
  cfg.l2_grid = (1e-4, 1.0)
  honest = fit_and_evaluate(x, y, x_test, y_test, num_classes=4, full_batch_config=cfg)
  other = [l for l in cfg.l2_grid if l != honest["l2"]][0]
  # Adversarial test labels: what the model with the other L2 predicts.
  std = logistic.Standardizer.fit(x)
  p_other, _ = logistic.fit_logistic(std(x), y, num_classes=4, l2=other)
  p_chosen, _ = logistic.fit_logistic(std(x), y, num_classes=4, l2=honest["l2"])
  y_adv = logistic.predict_scores(p_other, std(x_test)).argmax(1)
  test_acc = lambda p: logistic.accuracy(logistic.predict_scores(p, std(x_test)), y_adv)
  assert test_acc(p_other) > test_acc(p_chosen)  # choosing on test would pick `other`
  adversarial = fit_and_evaluate(x, y, x_test, y_adv, num_classes=4, full_batch_config=cfg)
  assert adversarial["l2"] == honest["l2"]
  assert adversarial["held_out_top1"] == honest["held_out_top1"]
  assert adversarial["top1"] != honest["top1"]


def test_select_l2_picks_regularisation_on_held_out_rows():
  # Shapes as in the test above (one compilation serves both).
  x, y = _blobs(3, n=400, d=30, noise=3.0)
  sel = logistic.select_l2(x, y, num_classes=4, l2_grid=(1e-4, 1.0), held_out_fraction=0.1,
                           seed=0)
  accs = {g["l2"]: g["held_out_top1"] for g in sel["grid"]}
  assert sel["l2"] == max(accs, key=lambda l: (accs[l], l))
  assert sel["held_out_size"] == 40
  # The held-out rows decide: a different held-out draw is a different selection problem.
  fit_rows, held_rows = logistic.split_held_out(400, 0.1, 0)
  assert len(np.intersect1d(fit_rows, held_rows)) == 0 and len(fit_rows) + len(held_rows) == 400
  with pytest.raises(ValueError, match="held_out_fraction"):
    logistic.split_held_out(10, 1.0, 0)


def test_probe_config_splits_an_encoder_list():
  from jaxcontrast.eval import config as probe_config_lib
  c = default_probe_config()
  c.encoder = "target, random,pixels"
  assert [p.encoder for p in probe_config_lib.split_encoders(c)] == ["target", "random", "pixels"]
  assert c.encoder == "target, random,pixels"   # the caller's config is left alone
  for bad, match in (("target,nope", "config encoder = 'target,nope'"),
                     ("random,random", "config encoder = 'random,random'")):
    c.encoder = bad
    with pytest.raises(ConfigError, match=match):
      probe_config_lib.split_encoders(c)
  c.encoder, c.output = "target,random", "x.json"
  with pytest.raises(ConfigError, match="config output = 'x.json'"):
    probe_config_lib.validate(c)
