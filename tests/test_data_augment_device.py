"""augment_jax (the accelerator's photometric augmentations) against the TF ops of augment.py.

The reference is the TensorFlow implementation, an independent one in another framework, fed the
same images and the same per-example parameters. Tolerances are float32 rounding: the two differ
in summation orders (contrast's mean, the blur's taps) and in fused multiply-adds (XLA contracts
a * b + c into one rounding; TF's Eigen kernels do not), a few ulps of values in [0, 1].
Measured on CPU, max |JAX - TF|: 0 for brightness and solarize; <= 1.8e-7 for saturation and
grayscale; <= 1.2e-7 for contrast; 1 ulp (2.4e-7) for normalize; <= 2.4e-7 for the blur; <= 9e-7
for hue, whose RGB has slope 6 in h (an ulp of h, 6e-8, is a few ulps of RGB); <= 1.6e-6 for the
4 chained jitter ops; <= 9e-7 for whole views. ATOL = 1e-5 leaves room for other CPUs' choices
and is still 400 x below any op's effect (a 1/255 step is 4e-3).
"""
import dataclasses
import functools
import itertools
import os
import subprocess
import sys

import jax
import jax.extend
import numpy as np
import pytest
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec as P

from compile_options import DEFAULT_CPU_EMITTERS
from jaxcontrast.data import augment
from jaxcontrast.data import augment_jax as aj
from jaxcontrast.data.recipes import RECIPES

ATOL = 1e-5
# Every program here on XLA's default CPU emitters: the suite's faster ones miscompile the colour
# jitter (tests/compile_options.py).
_jit = functools.partial(jax.jit, compiler_options=DEFAULT_CPU_EMITTERS)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(seed, shape):
  """Uniform pixels plus the HSV edge cases: grays (hue undefined), black, white, channel ties
  (which branch of the hue formula wins), saturated primaries, and 1/255-quantised pixels (many
  exact ties, as crops of uint8 images have)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=shape).astype(np.float32)
  x[0] = 0.5
  x[1] = 1.0
  x[2] = 0.0
  x[3] = np.round(x[3] * 255) / 255
  if shape[-1] == 3:
    x[4, ..., 0] = x[4, ..., 1]  # r = g.
    x[5, ..., 1] = x[5, ..., 2]  # g = b.
    x[6, ..., 0], x[6, ..., 2] = 1.0, 0.0  # Red to yellow.
    x[7] = np.round(x[7] * 3) / 3  # Few levels: r = g = b and r = v = max ties everywhere.
    x[8, ..., 0] = x[8, ..., 2]  # r = b.
  return x


def _close(jax_out, tf_out, atol=ATOL):
  np.testing.assert_allclose(np.asarray(jax_out), np.asarray(tf_out), rtol=0, atol=atol)


def _stack_params(recipe, n, height, width, seed=0):
  """n examples' params of one view from `augment.sample_views_params`, as NumPy (B, ...)."""
  views = [augment.sample_views_params(tf.constant([seed, i], tf.int64), [recipe], height, width)
           for i in range(n)]
  return {k: np.concatenate([v[k].numpy() for v in views]) for k in views[0]}


# ---------------------------------------------------------------------------------------------
# 1. Each op alone.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("op", ["brightness", "contrast", "saturation", "hue"])
def test_jitter_op_matches_tf(op, channels):
  x = _images(1, (12, 9, 11, channels))
  rng = np.random.default_rng(2)
  if op == "hue":
    arg = rng.uniform(-0.5, 0.5, 12).astype(np.float32)
    arg[:3] = (0.0, 0.5, -0.5)
  else:
    arg = rng.uniform(0.0, 2.0, 12).astype(np.float32)  # > 1 clips.
    arg[:3] = (0.0, 1.0, 2.0)
  out = _jit(getattr(aj, "adjust_" + op))(x, arg)
  _close(out, getattr(augment, "adjust_" + op)(tf.constant(x), tf.constant(arg)))
  if channels == 1 and op in ("saturation", "hue"):
    np.testing.assert_array_equal(out, x)  # Identities on gray images.


def test_hsv_conversions_match_tf():
  x = _images(3, (10, 6, 7, 3)).reshape(-1, 3)
  hsv = _jit(aj.rgb_to_hsv)(x)
  _close(hsv, tf.image.rgb_to_hsv(x), atol=1e-6)
  gray = (x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])
  assert gray.sum() > 100
  np.testing.assert_array_equal(np.asarray(hsv)[gray, :2], 0.0)  # Grays: h = s = 0 (as TF).
  assert np.asarray(hsv)[:, 0].max() < 1.0 and np.asarray(hsv).min() >= 0.0
  h = np.random.default_rng(4).uniform(size=(500, 3)).astype(np.float32)
  h[:7, 0] = np.arange(7) / 6  # Sector boundaries, h = 1 included.
  _close(_jit(aj.hsv_to_rgb)(h), tf.image.hsv_to_rgb(h), atol=1e-6)


@pytest.mark.parametrize("channels", [3, 1])
def test_grayscale_solarize_normalize_match_tf(channels):
  x = _images(5, (10, 7, 8, channels))
  x[:, 0, 0] = 0.4  # At the threshold: inverted (>=).
  apply = np.arange(10) % 3 == 0
  _close(_jit(aj.grayscale)(x, apply), augment.grayscale(tf.constant(x), apply))
  out = _jit(aj.solarize, static_argnums=2)(x, apply, 0.4)
  _close(out, augment.solarize(tf.constant(x), apply, 0.4))
  np.testing.assert_array_equal(np.asarray(out)[~apply], x[~apply])
  mean, std = MEAN[:channels], STD[:channels]
  _close(_jit(aj.normalize, static_argnums=(1, 2))(x, mean, std),
         augment.normalize(tf.constant(x), mean, std))


@pytest.mark.parametrize("shape,kernel_size", [((9, 24, 24, 3), None), ((9, 16, 30, 1), None),
                                               ((9, 13, 10, 3), 9)])
def test_blur_matches_tf(shape, kernel_size):
  x = _images(6, shape)
  sigma = np.random.default_rng(7).uniform(0.1, 3.0, shape[0]).astype(np.float32)
  sigma[[1, 4]] = 0.0
  out = _jit(aj.gaussian_blur, static_argnums=2)(x, sigma, kernel_size)
  _close(out, augment.gaussian_blur(tf.constant(x), sigma, kernel_size))
  assert np.abs(np.asarray(out)[5] - x[5]).max() > 0.05  # It does blur.


def test_blur_matches_numpy_reflect_convolution():
  """An independent NumPy reference: np.pad 'reflect' (edge not repeated), then the taps."""
  x = np.random.default_rng(8).uniform(size=(2, 7, 9, 1)).astype(np.float32)
  sigma, k = np.float32([0.8, 2.5]), 7
  out = np.asarray(_jit(aj.gaussian_blur, static_argnums=2)(x, sigma, k))
  for b in range(2):
    d = np.arange(k) - k // 2
    g = np.exp(-0.5 * (d / np.float64(sigma[b])) ** 2)
    g /= g.sum()
    p = np.pad(x[b, ..., 0].astype(np.float64), k // 2, mode="reflect")
    rows = sum(g[t] * p[:, t:t + 9] for t in range(k))
    expected = sum(g[t] * rows[t:t + 7] for t in range(k))
    np.testing.assert_allclose(out[b, ..., 0], expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. Colour jitter: every order.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [3, 1])
def test_color_jitter_every_order_matches_tf(channels):
  perms = np.array(list(itertools.permutations(range(4))), np.int32)  # All 24.
  n = len(perms) + 4
  rng = np.random.default_rng(9)
  params = {
      "order": np.concatenate([perms, perms[rng.integers(0, 24, 4)]]),
      "jitter": np.arange(n) < 24,  # The last 4 skip jitter.
      "brightness": rng.uniform(0.3, 1.7, n).astype(np.float32),
      "contrast": rng.uniform(0.3, 1.7, n).astype(np.float32),
      "saturation": rng.uniform(0.3, 1.7, n).astype(np.float32),
      "hue": rng.uniform(-0.3, 0.3, n).astype(np.float32),
  }
  x = _images(10, (n, 8, 9, channels))
  x[::5] = x[0:1]  # Some examples alike but for their order: the order must matter.
  out = np.asarray(_jit(aj.color_jitter)(x, params))
  _close(out, augment.color_jitter(tf.constant(x), {k: tf.constant(v) for k, v in params.items()}))
  np.testing.assert_array_equal(out[24:], x[24:])
  assert np.abs(out[0] - out[5]).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# 3. A whole view, params drawn by the TF sampler for the library's recipes.
# ---------------------------------------------------------------------------------------------


# Every op with probabilities that give each pair of ops examples with both: pins the op order.
_ALL_OPS = dataclasses.replace(RECIPES["sce_imagenet"][1], blur_prob=0.5, solarize_prob=0.5)


@pytest.mark.parametrize("recipe,size", [
    (RECIPES["mocov2"][0], (32, 32)), (RECIPES["mocov2"][0], (24, 40)),
    (RECIPES["sce_imagenet"][0], (32, 32)), (RECIPES["sce_imagenet"][1], (24, 40)),
    (RECIPES["mocov2_cifar"][0], (32, 32)), (_ALL_OPS, (32, 32)), (_ALL_OPS, (24, 40))])
def test_apply_view_params_matches_tf(recipe, size):
  height, width = size
  params = _stack_params(recipe, 32, height, width, seed=height)
  assert params["jitter"].any() and not params["jitter"].all() and params["grayscale"].any()
  assert recipe.solarize_prob == 0 or params["solarize"].any()
  assert recipe.blur_prob == 0 or (params["blur_sigma"] > 0).any()
  if recipe is _ALL_OPS:
    blur = params["blur_sigma"] > 0
    assert (blur & params["solarize"]).any() and (blur & params["grayscale"]).any()
  x = np.random.default_rng(11).integers(0, 256, (32, height, width, 3)).astype(np.uint8)
  out = _jit(aj.augment_views, static_argnums=(2, 3, 4))(x, params, recipe, MEAN, STD)
  tf_params = {k: tf.constant(v) for k, v in params.items()}
  expected = augment.normalize(
      augment.apply_view_params(tf.cast(x, tf.float32) / 255.0, tf_params, recipe), MEAN, STD)
  _close(out, expected, atol=ATOL / min(STD))  # normalize scales the error by 1 / std.


# ---------------------------------------------------------------------------------------------
# 4. Blur edge cases.
# ---------------------------------------------------------------------------------------------


def test_blur_edge_cases():
  assert aj.blur_kernel_size(224) == 23
  assert aj.blur_kernel_size(32) == 3
  x = _images(12, (10, 16, 16, 3))
  sigma = np.float32([0.0, -1.0] * 4 + [1.0, 0.0])
  out = np.asarray(_jit(aj.gaussian_blur)(x, sigma))
  np.testing.assert_array_equal(out[sigma <= 0], x[sigma <= 0])  # Bitwise unchanged.
  const = np.full((2, 16, 20, 1), 0.3, np.float32)
  np.testing.assert_allclose(_jit(aj.gaussian_blur)(const, np.float32([0.5, 2.0])), 0.3,
                             atol=1e-6)
  with pytest.raises(ValueError, match="too large"):
    aj.gaussian_blur(x[:, :4, :4], sigma, kernel_size=9)


# ---------------------------------------------------------------------------------------------
# 5, 6. Under jit on a sharded batch; precision; no TensorFlow.
# ---------------------------------------------------------------------------------------------


def test_sharded_batch_needs_no_communication():
  recipe = RECIPES["sce_imagenet"][1]  # Every op: jitter, grayscale, blur, solarize.
  params = _stack_params(recipe, 16, 24, 24, seed=3)
  x = np.random.default_rng(13).integers(0, 256, (16, 24, 24, 3)).astype(np.uint8)
  fn = _jit(aj.augment_views, static_argnums=(2, 3, 4))
  single = np.asarray(fn(x, params, recipe, MEAN, STD))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  xs = jax.device_put(x, sharding)
  ps = jax.device_put(params, sharding)
  compiled = fn.lower(xs, ps, recipe, MEAN, STD).compile()   # run and inspected: one compile
  out = compiled(xs, ps)
  assert out.sharding.is_equivalent_to(sharding, out.ndim)
  # Equal to rounding: XLA compiles 2-example shards into other loops (fused multiply-adds,
  # summation orders) than the 16-example batch (measured: <= 1.5e-6 after normalize).
  _close(out, single)
  hlo = compiled.as_text()
  for collective in ("all-reduce", "all-gather", "all-to-all", "collective-permute",
                     "reduce-scatter"):
    assert collective not in hlo, collective


def _matrix_products(jaxpr):
  """The dot_general and convolution equations in `jaxpr` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      found.append(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _matrix_products(sub)
  return found


def test_no_matrix_products_so_no_precision_setting_applies():
  """Default-precision products are TF32 on GPU and one bf16 pass on TPU: the augmentation
  (every op of the SCE recipe, blur included) must be element-wise float32 work only."""
  recipe = RECIPES["sce_imagenet"][1]
  params = _stack_params(recipe, 2, 16, 16)
  x = np.zeros((2, 16, 16, 3), np.uint8)
  jaxpr = jax.make_jaxpr(lambda x, p: aj.augment_views(x, p, recipe, MEAN, STD))(x, params)
  assert _matrix_products(jaxpr.jaxpr) == []
  # The check sees products where there are some.
  banded = jax.make_jaxpr(lambda x, m: jax.numpy.einsum("bhwc,bwv->bhvc", x, m))(
      np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 4, 4), np.float32))
  assert _matrix_products(banded.jaxpr) == ["dot_general"]


def test_imports_no_tensorflow():
  code = ("import sys, jaxcontrast.data.augment_jax; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root,
                 env={**os.environ, "PYTHONPATH": root})


# ---------------------------------------------------------------------------------------------
# 7. Through the pipeline (data.augment_on = "device") and the step's DeviceAugment.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _pipeline_batch(augment_on):
  """First batch of 8 mock CIFAR-10 (colour noise) examples, SCE's ImageNet recipe (every op),
  2 FNC support views and a 16 px local crop."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxcontrast.data.config import default_data_config  # pylint: disable=g-import-not-at-top
  cfg = default_data_config()
  cfg.update(dataset="cifar10", data_dir="/nonexistent/mocked", recipe="sce_imagenet",
             num_support_views=2, local_crop_sizes=(16,), shuffle_buffer=8, threadpool_size=0,
             augment_on=augment_on)
  with tfds.testing.mock_data(num_examples=16):
    ds = pipeline.make_train_dataset(cfg, batch_size=8, seed=1, process_index=0,
                                     process_count=1)
    batch = next(iter(tfds.as_numpy(ds)))
    spec = pipeline.device_augment(cfg)
  return batch, spec


VIEWS = ("view1", "view2", "support", "local_0")


def test_pipeline_device_path_equals_host_path():
  """The device path (uint8 crops + params -> DeviceAugment under jit, batch sharded over
  `devices`) against (a) TF's ops on the same uint8 crops and params: float32 rounding (ATOL /
  min std); (b) the host path, which applies them to the float crops before any rounding to
  uint8: the crops differ by at most 0.5 / 255, which the ops can amplify (jitter factors up to
  1.4, hue's slope): bound 4 / 255 / min std in normalised units (measured max 0.035, i.e.
  2.2 / 255 before normalisation, on 1 and 8 devices). Both device counts in one test: the two
  tf.data pipelines are built once."""
  host, _ = _pipeline_batch("host")
  dev, spec = _pipeline_batch("device")
  assert set(dev["aug"]) == set(VIEWS) and dev["view1"].dtype == np.uint8
  assert dev["support"].shape == (8, 2, 32, 32, 3) and dev["local_0"].shape == (8, 16, 16, 3)
  assert set(dev["aug"]["view1"]) == set(aj.PARAM_KEYS)
  for key in ("id", "label", "key_id"):
    np.testing.assert_array_equal(host[key], dev[key])
  for devices in (1, 8):
    _assert_device_path_equals_host_path(devices, host, dev, spec)


def _assert_device_path_equals_host_path(devices, host, dev, spec):
  from jaxcontrast.sharding import global_batch_from_local, make_mesh  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(devices)
  out = _jit(spec)(global_batch_from_local(mesh, dev))
  assert "aug" not in out
  recipes, std = dict(spec.recipes), min(spec.std)
  worst = 0.0
  for name in VIEWS:
    got = np.asarray(out[name])
    assert got.dtype == np.float32 and got.shape == dev[name].shape
    # (a) TF's ops on the very inputs the device got.
    lead = dev[name].shape[:-3]
    flat = tf.constant(dev[name].reshape(-1, *dev[name].shape[-3:]), tf.float32) / 255.0
    params = {k: tf.constant(np.reshape(v, (flat.shape[0], *v.shape[len(lead):])))
              for k, v in dev["aug"][name].items()}
    want = augment.normalize(augment.apply_view_params(flat, params, recipes[name]),
                             spec.mean, spec.std)
    _close(got.reshape(want.shape), want, atol=ATOL / std)
    # (b) The host path.
    diff = np.abs(got - host[name]).max()
    worst = max(worst, diff)
    assert diff < 4 / 255 / std, (name, diff)
  assert worst > 0   # the uint8 crops are not the float ones: (b) compares two paths


def test_device_augment_rejects_what_it_cannot_finish():
  _, spec = _pipeline_batch("device")
  batch = {"view1": np.zeros((2, 8, 8, 3), np.float32),
           "aug": {"view1": aj.random_params(np.random.default_rng(0), (2,))}}
  with pytest.raises(ValueError, match="expects uint8"):
    spec(batch)
  batch = {"view9": np.zeros((2, 8, 8, 3), np.uint8),
           "aug": {"view9": aj.random_params(np.random.default_rng(0), (2,))}}
  with pytest.raises(ValueError, match="no recipe"):
    spec(batch)
