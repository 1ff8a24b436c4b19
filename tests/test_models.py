"""Tests for jaxcontrast.models: ResNets, grouped BatchNorm, convolution, heads, config.

Kept fast on a 2-core CPU: shapes and parameter counts come from `jax.eval_shape` (tracing, no
compilation), numerical tests use width-1/8 networks on 16x16 / 32x32 inputs, and parameters for
numerical comparisons are drawn with NumPy (no compiled random initialisers).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxcontrast import models
from jaxcontrast.models import norm as norm_lib
from jaxcontrast.models import resnet as resnet_lib
from jaxcontrast.sharding import make_mesh


def _shapes(module, *args, **kwargs):
  """Variable shapes of `module.init` without running it."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))


def _np_variables(module, *args, seed=0, **kwargs):
  """Variables with `module.init`'s tree, filled by NumPy (no compilation).

  Kernels ~ N(0, 1/fan_in) keep activations O(1); scales/biases/statistics are perturbed away
  from their trivial init values so that they matter in the comparisons.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel":
      v = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
    elif name in ("scale", "var"):
      v = rng.uniform(0.5, 1.5, size=s.shape)
    else:  # bias, mean
      v = 0.1 * rng.normal(size=s.shape)
    return jnp.asarray(v, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, _shapes(module, *args, **kwargs))


def _tree_shapes(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), a.dtype), tree)


def _assert_trees_close(a, b, rtol, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- ResNet backbones


@pytest.mark.parametrize("arch,expected", [
    ("resnet18", 11_689_512 - 513_000),  # torchvision totals minus the 1000-way fc layer
    ("resnet34", 21_797_672 - 513_000),
    ("resnet50", 25_557_032 - 2_049_000),
    # ResNet-18 without the second basic block of each stage: 2 convs 3x3 C->C + 2 BN (2C each)
    # for C = 64, 128, 256, 512.
    ("resnet10", 11_689_512 - 513_000 - sum(2 * 9 * c * c + 4 * c for c in (64, 128, 256, 512))),
    # Stem (7x7x3x64 conv + BN), layer1 (two 3x3 64->64 convs + 2 BN), layer2 (3x3 64->128,
    # 3x3 128->128, 1x1 64->128 downsample, 3 BN).
    ("resnet6", 7 * 7 * 3 * 64 + 2 * 64 + 2 * 9 * 64 * 64 + 4 * 64
     + 9 * 64 * 128 + 9 * 128 * 128 + 64 * 128 + 6 * 128),
])
def test_full_width_parameter_counts_match_torchvision(arch, expected):
  variables = _shapes(models.build_resnet(arch), jnp.zeros((1, 224, 224, 3)), train=False)
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == expected
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))


# Every architecture with the ImageNet stem, and every stem and input channel count on the two
# basic-block depths: the stem is the same module whatever the blocks after it (tracing a
# ResNet-50/34 is most of this test's cost), and the input channels only reach conv1.
BACKBONE_SHAPE_CASES = (
    [(arch, feat, "imagenet", 3) for arch, feat in (("resnet6", 32), ("resnet10", 128),
                                                    ("resnet18", 128), ("resnet34", 128),
                                                    ("resnet50", 512))] +
    [("resnet10", 128, stem, 1) for stem in ("imagenet", "cifar", "cifar_s2")] +
    [(arch, 128, stem, 3) for arch in ("resnet10", "resnet18") for stem in ("cifar", "cifar_s2")])


@pytest.mark.parametrize("arch,feat,stem,channels", BACKBONE_SHAPE_CASES)
def test_backbone_shapes(arch, feat, stem, channels):
  net = models.build_resnet(arch, stem=stem, width=0.25)
  x = jnp.zeros((2, 32, 32, channels))
  variables = _shapes(net, x, train=False)
  y, state = jax.eval_shape(
      lambda v: net.apply(v, x, train=True, mutable=["batch_stats"],
                          capture_intermediates=True), variables)
  assert y.shape == (2, feat) == (2, models.feature_dim(arch, 0.25))
  stem_k = 7 if stem == "imagenet" else 3
  assert variables["params"]["conv1"]["kernel"].shape == (stem_k, stem_k, channels, 16)
  # ImageNet stem: /2 conv and /2 max-pool before stage 1; CIFAR stem keeps the resolution;
  # cifar_s2 halves it.
  side = {"imagenet": 8, "cifar": 32, "cifar_s2": 16}[stem]
  assert state["intermediates"]["layer1_0"]["__call__"][0].shape[1:3] == (side, side)
  # Stride 2 at every later stage: /8 after the 4th (/2 after ResNet-6's 2nd).
  last = len(resnet_lib.ARCHS[arch][0])
  assert state["intermediates"][f"layer{last}_0"]["__call__"][0].shape[1:3] == (
      side // 2 ** (last - 1),) * 2


def test_stride_padding_is_torchvision_symmetric():
  # 7x7/2 conv with padding 3 on a 6x6 input: output pixel (0, 0) sees rows/cols -3..3.
  # 7x7/2 conv on a 6x6 input: torchvision pads 3 on every side, so output (i, j) sees input
  # rows/cols 2i-3 .. 2i+3 and an impulse at (4, 4) reaches outputs i, j in {1, 2} only.
  # ("SAME" would pad 2 before / 3 after, and output (0, 0) would see it too.)
  x = jnp.zeros((1, 6, 6, 1)).at[0, 4, 4, 0].set(1.0)
  kernel = jnp.ones((7, 7, 1, 1))
  expected = np.array([[0, 0, 0], [0, 1, 1], [0, 1, 1]], np.float32)
  y = models.Conv(1, (7, 7), (2, 2)).apply({"params": {"kernel": kernel}}, x)
  np.testing.assert_array_equal(np.asarray(y[0, :, :, 0]), expected)


def test_stem_max_pool_is_torchvision_padding():
  # MaxPool2d(3, 2, padding=1) on 4x4: output (i, j) = max over rows/cols 2i-1 .. 2i+1.
  x = -np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  x[0, 2, 2, 0] = 100.0  # seen by outputs (1, 1) only ("SAME" would let (0, 0) see it)
  expected = np.array([[0, -1], [-4, 100]], np.float32)
  np.testing.assert_array_equal(resnet_lib.stem_max_pool(jnp.asarray(x))[0, :, :, 0],
                                expected)


def test_conv_init_is_kaiming_fan_out():
  conv = models.Conv(256, (3, 3))
  kernel = conv.init(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))["params"]["kernel"]
  np.testing.assert_allclose(np.std(kernel), math.sqrt(2.0 / (3 * 3 * 256)), rtol=0.03)
  assert abs(float(np.mean(kernel))) < 1e-3


def test_zero_init_residual_zeroes_last_norm_scale():
  conv = lambda *a, **k: models.Conv(*a, **k)  # noqa: E731
  block = models.BasicBlock(planes=4, strides=1, conv=conv,
                            norm=norm_lib.make_norm("batch", train=False),
                            zero_init_residual=True)
  params = block.init(jax.random.key(0), jnp.zeros((1, 2, 2, 4)))["params"]
  np.testing.assert_array_equal(params["bn1"]["scale"], np.ones(4))
  np.testing.assert_array_equal(params["bn2"]["scale"], np.zeros(4))
  # Off by default (torchvision): the last scale starts at 1.
  assert models.build_resnet("resnet18").zero_init_residual is False


def test_group_norm_backbone_has_no_batch_stats_and_divisible_groups():
  assert [norm_lib.gn_num_groups(c) for c in (8, 16, 48, 64, 512)] == [8, 16, 16, 32, 32]
  net = models.build_resnet("resnet18", stem="cifar", width=0.125, norm="group")
  x = jnp.zeros((2, 16, 16, 3))
  variables = _shapes(net, x, train=False)
  assert "batch_stats" not in variables
  assert jax.eval_shape(lambda v: net.apply(v, x, train=True), variables).shape == (2, 64)


def test_bfloat16_compute_keeps_float32_params_and_matches_float32():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 16, 3)), jnp.float32)
  f32 = models.build_resnet("resnet18", stem="cifar", width=0.125)
  bf16 = models.build_resnet("resnet18", stem="cifar", width=0.125, dtype=jnp.bfloat16)
  assert _tree_shapes(_shapes(bf16, x, train=False)) == _tree_shapes(_shapes(f32, x, train=False))
  variables = _np_variables(f32, x, train=False)
  y32, y16 = (jax.jit(lambda v, net=net: net.apply(v, x, train=True, mutable=["batch_stats"])[0])(
      variables) for net in (f32, bf16))
  assert y32.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
  rel = np.linalg.norm(np.asarray(y16, np.float32) - y32) / np.linalg.norm(y32)
  assert rel < 0.05, rel


# ----------------------------------------------------------------------- Conv vs flax.linen.Conv


@pytest.mark.parametrize("kernel,stride,cin", [
    (3, 1, 3), (3, 2, 5), (1, 1, 4), (1, 2, 4), (7, 2, 1), (7, 2, 3)])
def test_conv_matches_flax_conv_values_and_grads(kernel, stride, cin):
  rng = np.random.default_rng(kernel * 10 + stride + cin)
  x = jnp.asarray(rng.normal(size=(2, 11, 10, cin)), jnp.float32)
  pad = ((kernel // 2, kernel // 2),) * 2
  ref = nn.Conv(6, (kernel, kernel), (stride, stride), padding=pad, use_bias=True)
  ref_vars = ref.init(jax.random.key(0), x)
  ours = models.Conv(6, (kernel, kernel), (stride, stride), use_bias=True)
  assert _tree_shapes(_shapes(ours, x)) == _tree_shapes(ref_vars)
  out_shape = jax.eval_shape(ref.apply, ref_vars, x).shape
  cot = jnp.asarray(rng.normal(size=out_shape), jnp.float32)

  @jax.jit  # one compilation for both modules
  def value_and_grads(v, x):
    def one(mod):
      f = lambda v, x: jnp.sum(mod.apply(v, x) * cot)  # noqa: E731
      return mod.apply(v, x), jax.grad(f, argnums=(0, 1))(v, x)
    return one(ref), one(ours)

  expected, got = value_and_grads(ref_vars, x)
  _assert_trees_close(got, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- grouped BatchNorm


def _np_grouped_bn(x, groups, grouping, scale, bias, eps=1e-5):
  """Reference: split the batch into groups by index, normalise each with its own statistics."""
  b = x.shape[0]
  y = np.empty_like(x)
  means, variances = [], []
  for g in range(groups):
    idx = (np.arange(g, b, groups) if grouping == "strided"
           else np.arange(g * b // groups, (g + 1) * b // groups))
    xs = x[idx].reshape(-1, x.shape[-1])
    mu, var = xs.mean(0), xs.var(0)
    y[idx] = (x[idx] - mu) / np.sqrt(var + eps) * scale + bias
    means.append(mu)
    variances.append(var)
  return y, np.mean(means, 0), np.mean(variances, 0)


@pytest.mark.parametrize("grouping", ["strided", "contiguous"])
@pytest.mark.parametrize("shape", [(8, 3, 2, 5), (12, 6)])
def test_grouped_bn_train_matches_numpy_reference(grouping, shape):
  rng = np.random.default_rng(3)
  # Per-sample offsets and scales make every grouping give different statistics.
  x = rng.normal(size=shape) * rng.uniform(0.5, 3, size=(shape[0],) + (1,) * (len(shape) - 1))
  x = (x + 2 * rng.normal(size=(shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)
  groups = 4
  bn = models.GroupedBatchNorm(groups=groups, grouping=grouping)
  variables = _np_variables(bn, x, use_running_average=False)
  y, upd = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False,
                                         mutable=["batch_stats"]))(variables, x)
  p, s = variables["params"], variables["batch_stats"]
  y_ref, mu, var = _np_grouped_bn(x, groups, grouping, np.asarray(p["scale"]),
                                  np.asarray(p["bias"]))
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * s["mean"] + 0.1 * mu, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 * s["var"] + 0.1 * var, rtol=1e-5,
                             atol=1e-6)


def _np_grouped_bn_grads(x, r, groups, grouping, scale):
  """Reference gradients of sum(r * BN(x)) in float64, per group (n values per channel):
  d bias = sum r, d scale = sum r * xhat, dx = scale / sigma * (r - mean(r) - xhat mean(r xhat))."""
  b, c = x.shape[0], x.shape[-1]
  dx, dscale, dbias = np.empty_like(x), np.zeros(c), np.zeros(c)
  for g in range(groups):
    idx = (np.arange(g, b, groups) if grouping == "strided"
           else np.arange(g * b // groups, (g + 1) * b // groups))
    xs, rs = x[idx].reshape(-1, c), r[idx].reshape(-1, c)
    sigma = np.sqrt(xs.var(0) + 1e-5)
    xhat = (xs - xs.mean(0)) / sigma
    dbias += rs.sum(0)
    dscale += (rs * xhat).sum(0)
    dxs = scale / sigma * (rs - rs.mean(0) - xhat * (rs * xhat).mean(0))
    dx[idx] = dxs.reshape(x[idx].shape)
  return dx, dscale, dbias


@pytest.mark.parametrize("groups,grouping", [(4, "strided"), (4, "contiguous"), (1, "strided")])
@pytest.mark.parametrize("shape", [(8, 3, 2, 5), (12, 6)])
def test_grouped_bn_gradients_match_numpy_reference(groups, grouping, shape):
  """The train-mode layer's gradient is written out (`norm._train_backward`, a custom VJP; its
  sums in two stages on CPU): it must be BatchNorm's."""
  rng = np.random.default_rng(7)
  x = (rng.normal(size=shape) * rng.uniform(0.5, 3, size=(shape[0],) + (1,) * (len(shape) - 1))
       ).astype(np.float32)
  r = rng.normal(size=shape).astype(np.float32)
  bn = models.GroupedBatchNorm(groups=groups, grouping=grouping)
  v = _np_variables(bn, x, use_running_average=False)
  p = dict(scale=jnp.asarray(rng.uniform(0.5, 2, shape[-1]), jnp.float32),
           bias=jnp.asarray(rng.normal(size=shape[-1]), jnp.float32))

  def loss(params, x):
    y, _ = bn.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                    use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(y * r)

  dp, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)
  dx_ref, dscale_ref, dbias_ref = _np_grouped_bn_grads(
      x.astype(np.float64), r.astype(np.float64), groups, grouping, np.asarray(p["scale"]))
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dp["scale"], dscale_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dp["bias"], dbias_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,grouping", [(4, "strided"), (2, "contiguous")])
def test_grouped_bn_gradient_through_the_running_statistics(groups, grouping):
  """Training never differentiates the updated running statistics, but the layer's custom VJP
  must not drop their cotangents. mean' = m mean + (1 - m) mean_g(mu_g), so d mean' / dx =
  (1 - m) / (G n) for the n values of a channel in x's group; var' alike, with
  d var_g / dx = 2 (x - mu_g) / n."""
  shape, c = (8, 3, 2, 5), 5
  rng = np.random.default_rng(11)
  x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
  a, b = rng.normal(size=c), rng.normal(size=c)
  bn = models.GroupedBatchNorm(groups=groups, grouping=grouping)
  v = _np_variables(bn, x, use_running_average=False)

  def loss(x):
    _, new = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(new["batch_stats"]["mean"] * a) + jnp.sum(new["batch_stats"]["var"] * b)

  dx = jax.jit(jax.grad(loss))(x)
  ref, x64 = np.empty(shape), x.astype(np.float64)
  for g in range(groups):
    idx = (np.arange(g, shape[0], groups) if grouping == "strided"
           else np.arange(g * shape[0] // groups, (g + 1) * shape[0] // groups))
    xs = x64[idx]
    n = xs.size // c
    mu = xs.reshape(-1, c).mean(0)
    ref[idx] = (1 - bn.momentum) / groups * (a + 2 * b * (xs - mu)) / n
  np.testing.assert_allclose(dx, ref, rtol=1e-5, atol=1e-7)


def test_grouped_bn_variance_of_a_nearly_constant_channel():
  """A channel far from 0 that barely varies (100 +- 0.01): E[x^2] - E[x]^2 in float32 cancels to
  noise there (E[x^2] = 1e4 has an ulp of 1e-3, the variance is 1e-4: measured off by 4 in y);
  two passes do not. What is left is the float32 mean's own rounding (ulp 7.6e-6 at 100, over a
  spread of 0.01): 5e-3 in y, measured."""
  rng = np.random.default_rng(6)
  x = (100 + 0.01 * rng.normal(size=(16, 4, 4, 3))).astype(np.float32)
  bn = models.GroupedBatchNorm(groups=1)
  variables = _np_variables(bn, x, use_running_average=False)
  y, upd = jax.jit(lambda v, x: bn.apply(v, x, use_running_average=False,
                                         mutable=["batch_stats"]))(variables, x)
  x64 = x.astype(np.float64).reshape(-1, 3)
  var = x64.var(0)
  p = variables["params"]
  y_ref = (x - x64.mean(0)) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])
  np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-2)
  np.testing.assert_allclose(upd["batch_stats"]["var"],
                             0.9 * variables["batch_stats"]["var"] + 0.1 * var, rtol=1e-3)


def test_grouped_bn_eval_uses_running_stats():
  x = np.random.default_rng(4).normal(size=(6, 3, 3, 4)).astype(np.float32)
  bn = models.GroupedBatchNorm(groups=2, use_running_average=True)
  v = _np_variables(bn, x)
  y, upd = bn.apply(v, x, mutable=["batch_stats"])
  s, p = v["batch_stats"], v["params"]
  y_ref = (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  _assert_trees_close(upd["batch_stats"], s, rtol=0, atol=0)
  # Eval mode does not look at the batch: one sample alone gives the same output.
  np.testing.assert_allclose(bn.apply(v, x[:1]), y[:1], rtol=1e-6, atol=1e-6)


def test_grouped_bn_with_one_group_equals_flax_batchnorm():
  x = np.random.default_rng(5).normal(size=(6, 4, 4, 3)).astype(np.float32) * 2 + 1
  ours = models.GroupedBatchNorm(groups=1)
  ref = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  v = _np_variables(ref, x, use_running_average=False)
  assert _tree_shapes(_shapes(ours, x, use_running_average=False)) == _tree_shapes(v)
  # One compiled program: both modules, both modes.
  outs = jax.jit(lambda v, x: [[m.apply(v, x, use_running_average=not train,
                                        mutable=["batch_stats"]) for m in (ours, ref)]
                               for train in (True, False)])(v, x)
  for got, want in outs:
    _assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


def test_grouped_bn_init_does_not_move_running_stats():
  v = models.GroupedBatchNorm(groups=2).init(jax.random.key(0), 5 + jnp.ones((4, 3)),
                                             use_running_average=False)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))


def test_grouped_bn_rejects_indivisible_batch_and_bad_grouping():
  x = jnp.ones((6, 3))
  with pytest.raises(ValueError, match="not divisible"):
    models.GroupedBatchNorm(groups=4).init(jax.random.key(0), x, use_running_average=False)
  with pytest.raises(ValueError, match="bn_grouping"):
    models.GroupedBatchNorm(groups=2, grouping="random").init(
        jax.random.key(0), x, use_running_average=False)


@pytest.mark.parametrize("groups,grouping,local", [
    (8, "contiguous", True), (16, "contiguous", True), (4, "contiguous", False),
    (1, "contiguous", False),
    (8, "strided", False)])
def test_contiguous_bn_statistics_are_device_local(groups, grouping, local):
  # Batch of 16 sharded over 8 devices (2 samples each): contiguous groups that lie inside one
  # device's shard (G = 8 or 16) need no collective to normalise; groups spanning devices
  # (G = 4), SyncBN (G = 1) and strided groups do.
  mesh = make_mesh(8)
  bn = models.GroupedBatchNorm(groups=groups, grouping=grouping, use_running_average=False)
  x = jax.device_put(jnp.ones((16, 4, 4, 8)), NamedSharding(mesh, P("data")))
  v = bn.init(jax.random.key(0), x)
  f = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"])[0],
              out_shardings=NamedSharding(mesh, P("data")))
  hlo = f.lower(v, x).compile().as_text()
  has_collective = any(op in hlo for op in ("all-reduce", "all-gather", "all-to-all",
                                            "collective-permute"))
  assert has_collective != local


# ----------------------------------------------------------------------------- heads and encoder


def test_moco_v2_projector_layer_structure():
  head = models.MLPHead(hidden_dims=(2048,), out_dim=128)
  v = _shapes(head, jnp.zeros((2, 2048)), train=False)
  assert "batch_stats" not in v
  assert jax.tree.map(lambda a: a.shape, v["params"]) == {
      "fc0": {"kernel": (2048, 2048), "bias": (2048,)},
      "fc_out": {"kernel": (2048, 128), "bias": (128,)}}


def test_sce_projector_and_predictor_structure():
  proj = models.MLPHead(hidden_dims=(2048,), out_dim=256, use_bn=True, last_bn=True)
  v = _shapes(proj, jnp.zeros((2, 2048)), train=False)
  assert set(v["params"]) == {"fc0", "bn0", "fc_out"}  # last BN has no affine parameters
  assert v["params"]["bn0"]["scale"].shape == (2048,)
  assert jax.tree.map(lambda a: a.shape, v["batch_stats"]) == {
      "bn0": {"mean": (2048,), "var": (2048,)}, "bn_out": {"mean": (256,), "var": (256,)}}
  pred = models.MLPHead(hidden_dims=(4096,), out_dim=256, use_bn=True)
  v = _shapes(pred, jnp.zeros((2, 256)), train=False)
  assert v["params"]["fc0"]["kernel"].shape == (256, 4096)
  assert v["params"]["fc_out"]["kernel"].shape == (4096, 256)


def test_head_numerics_relu_and_last_bn():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  head = models.MLPHead(hidden_dims=(7,), out_dim=3, last_bn=True)
  v = _np_variables(head, x, train=False)
  y, _ = jax.jit(lambda v, x: head.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  p = v["params"]
  z = np.maximum(x @ p["fc0"]["kernel"] + p["fc0"]["bias"], 0)
  z = z @ p["fc_out"]["kernel"] + p["fc_out"]["bias"]
  np.testing.assert_allclose(y, (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5), rtol=1e-4,
                             atol=1e-4)


def test_head_uses_pytorch_linear_init():
  v = models.MLPHead(hidden_dims=(), out_dim=512).init(jax.random.key(0), jnp.zeros((1, 400)),
                                                       train=False)
  bound = 1 / math.sqrt(400)
  for name in ("kernel", "bias"):
    w = np.asarray(v["params"]["fc_out"][name])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
  np.testing.assert_allclose(np.std(v["params"]["fc_out"]["kernel"]), bound / math.sqrt(3),
                             rtol=0.02)


def _tiny_config(**overrides):
  cfg = models.default_model_config()
  cfg.update(dict(arch="resnet18", stem="cifar", width=0.125))
  cfg.update(overrides)
  return cfg


def test_encoder_sce_recipe_outputs_and_predict_flag():
  cfg = _tiny_config(proj_hidden_dims=(32,), proj_dim=16, proj_bn=True, proj_last_bn=True,
                     pred_hidden_dims=(24,), pred_dim=16)
  enc = models.build_encoder(cfg)
  x = jnp.zeros((4, 16, 16, 3))
  # Initialising with predict=False (the target's call) still creates the predictor.
  v = _shapes(enc, x, train=False, predict=False)
  assert set(v["params"]) == {"backbone", "projector", "predictor"}
  assert v["params"]["predictor"]["fc0"]["kernel"].shape == (16, 24)
  assert _tree_shapes(v) == _tree_shapes(_shapes(enc, x, train=False))

  def run(predict):
    return jax.eval_shape(lambda v: enc.apply(v, x, train=True, predict=predict,
                                              mutable=["batch_stats"]), v)
  out, upd = run(True)
  assert {k: a.shape for k, a in out.items()} == {
      "features": (4, 64), "projection": (4, 16), "prediction": (4, 16)}
  assert all(a.dtype == jnp.float32 for a in out.values())
  out, upd_target = run(False)
  assert set(out) == {"features", "projection"}
  # The target pass returns the whole batch_stats tree (predictor stats untouched).
  assert _tree_shapes(upd_target) == _tree_shapes(upd)


@pytest.mark.parametrize("overrides,feat,hidden,proj", [
    (dict(arch="resnet18", stem="cifar", width=1.0, proj_hidden_dims=(512,), proj_dim=128),
     512, 512, 128),  # MoCo / SCE CIFAR: 512-512-128
    (dict(), 2048, 2048, 128),  # defaults: MoCo v2 ImageNet R50, 2048-2048-128
])
def test_encoder_recipe_dims(overrides, feat, hidden, proj):
  enc = models.build_encoder(overrides)
  x = jnp.zeros((2, 32, 32, 3))
  v = _shapes(enc, x, train=False)
  out = jax.eval_shape(lambda v: enc.apply(v, x, train=False), v)
  assert {k: a.shape for k, a in out.items()} == {"features": (2, feat), "projection": (2, proj)}
  assert v["params"]["projector"]["fc0"]["kernel"].shape == (feat, hidden)
  assert v["params"]["projector"]["fc_out"]["kernel"].shape == (hidden, proj)
  assert set(v["params"]["projector"]) == {"fc0", "fc_out"}


def test_encoder_bfloat16_outputs_float32_params():
  enc = models.build_encoder(_tiny_config(dtype="bfloat16", proj_hidden_dims=(8,), proj_dim=4))
  x = jnp.zeros((2, 16, 16, 1))
  v = _shapes(enc, x, train=False)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
  out = jax.eval_shape(lambda v: enc.apply(v, x, train=False), v)
  assert all(a.dtype == jnp.float32 for a in out.values())


def test_default_model_config_keys():
  assert set(models.default_model_config()) == {
      "arch", "stem", "width", "norm", "bn_groups", "bn_grouping", "dtype",
      "zero_init_residual", "proj_hidden_dims", "proj_dim", "proj_bn", "proj_last_bn",
      "pred_hidden_dims", "pred_dim", "pred_bn"}


@pytest.mark.parametrize("key,value", [
    ("arch", "resnet101"), ("stem", "tiny"), ("width", 0), ("width", "big"), ("norm", "layer"),
    ("bn_groups", 0), ("bn_groups", 2.0), ("bn_grouping", "random"), ("dtype", "float16"),
    ("proj_hidden_dims", (0,)), ("proj_dim", 0), ("pred_dim", -1),
    ("proj_bn", 1), ("pred_hidden_dims", 128), ("not_a_key", 1)])
def test_build_encoder_rejects_invalid_config(key, value):
  with pytest.raises(ValueError, match=key):
    models.build_encoder({key: value})


def test_resnet6_weights_are_recognised_and_have_no_torchvision_model():
  """A 2-stage state dict (torchvision's keys, layer1 and layer2 only) reads as ResNet-6, and
  the export names no torchvision constructor for it (torchvision's ResNet has 4 stages)."""
  from jaxcontrast.models import torch_weights  # pylint: disable=g-import-not-at-top
  state_dict = {"conv1.weight": np.zeros((8, 1, 3, 3)), "bn1.running_mean": np.zeros(8),
                "layer1.0.conv1.weight": np.zeros((8, 8, 3, 3)),
                "layer2.0.conv1.weight": np.zeros((16, 8, 3, 3))}
  assert torch_weights.infer_model_config(state_dict) == dict(
      arch="resnet6", stem="cifar", width=0.125, norm="batch", in_channels=1)
  state_dict["layer3.0.conv1.weight"] = np.zeros((32, 16, 3, 3))
  with pytest.raises(ValueError, match=r"has \(1, 1, 1, 0\) basic blocks"):
    torch_weights.infer_model_config(state_dict)
  assert torch_weights.torchvision_model("resnet6", "cifar", 1.0)[0] is None
  assert torch_weights.torchvision_model("resnet10", "cifar", 1.0)[0] is not None
