"""Augmentation ops: exact results on small images, ranges, determinism, channel handling."""
import colorsys

import numpy as np
import pytest
import tensorflow as tf

from jaxcontrast.data import augment
from jaxcontrast.data.augment import ViewRecipe


def _key(i):
  return tf.constant([7, i], tf.int64)


def _batch(seed=0, shape=(4, 8, 8, 3)):
  return tf.constant(np.random.default_rng(seed).uniform(size=shape).astype(np.float32))


def test_solarize_exact():
  x = tf.constant([[0.1, 0.5], [0.49, 0.9]], tf.float32)[None, :, :, None]
  out = augment.solarize(x, tf.constant([True]), threshold=0.5).numpy()[0, ..., 0]
  np.testing.assert_allclose(out, [[0.1, 0.5], [0.49, 0.1]], atol=1e-7)
  kept = augment.solarize(x, tf.constant([False]), threshold=0.5).numpy()
  np.testing.assert_array_equal(kept, x.numpy())


def test_grayscale_exact_and_identity_on_one_channel():
  x = _batch()
  out = augment.grayscale(x, tf.constant([True, False, True, False])).numpy()
  luma = x.numpy() @ np.array([0.299, 0.587, 0.114], np.float32)
  for i in (0, 2):
    for c in range(3):
      np.testing.assert_allclose(out[i, ..., c], luma[i], atol=1e-6)
  np.testing.assert_array_equal(out[1], x.numpy()[1])
  gray = _batch(shape=(2, 5, 5, 1))
  np.testing.assert_array_equal(augment.grayscale(gray, tf.constant([True, True])), gray)


def test_flip_exact():
  x = tf.reshape(tf.range(2 * 2 * 3 * 1, dtype=tf.float32), [2, 2, 3, 1])
  out = augment.flip_left_right(x, tf.constant([True, False])).numpy()
  np.testing.assert_array_equal(out[0], x.numpy()[0, :, ::-1])
  np.testing.assert_array_equal(out[1], x.numpy()[1])


def test_blur_preserves_mean_and_smooths():
  x = _batch(shape=(3, 32, 32, 3))
  out = augment.gaussian_blur(x, tf.constant([1.5, 0.0, 2.0])).numpy()
  np.testing.assert_allclose(out[[0, 2]].mean(axis=(1, 2)), x.numpy()[[0, 2]].mean(axis=(1, 2)),
                             atol=5e-3)
  assert out[0].std() < 0.6 * x.numpy()[0].std()  # White noise loses most of its variance.
  np.testing.assert_array_equal(out[1], x.numpy()[1])  # sigma 0 = no blur, exactly.
  const = tf.fill([2, 16, 16, 1], 0.3)
  np.testing.assert_allclose(augment.gaussian_blur(const, tf.constant([0.5, 2.0])), 0.3,
                             atol=1e-6)


def test_blur_kernel_about_ten_percent():
  assert augment.blur_kernel_size(224) == 23  # BYOL's kernel.
  assert augment.blur_kernel_size(32) == 3
  assert augment.blur_kernel_size(96) % 2 == 1 and 9 <= augment.blur_kernel_size(96) <= 11


def test_blur_matches_separable_gaussian():
  x = np.zeros((1, 9, 9, 1), np.float32)
  x[0, 4, 4, 0] = 1.0  # An impulse: the output is the kernel itself.
  out = augment.gaussian_blur(tf.constant(x), tf.constant([1.0]), kernel_size=5).numpy()[0, ..., 0]
  g = np.exp(-0.5 * np.arange(-2, 3) ** 2)
  g /= g.sum()
  np.testing.assert_allclose(out[2:7, 2:7], np.outer(g, g), atol=1e-6)


def test_brightness_contrast_saturation_torchvision_semantics():
  x = _batch(1)
  np.testing.assert_allclose(augment.adjust_brightness(x, tf.fill([4], 0.5)), x.numpy() * 0.5,
                             atol=1e-7)
  gray_mean = (x.numpy() @ np.array([0.299, 0.587, 0.114], np.float32)).mean(axis=(1, 2))
  expected = np.clip(x.numpy() * 1.3 + gray_mean[:, None, None, None] * -0.3, 0, 1)
  np.testing.assert_allclose(augment.adjust_contrast(x, tf.fill([4], 1.3)), expected, atol=1e-6)
  desaturated = augment.adjust_saturation(x, tf.zeros([4])).numpy()
  np.testing.assert_allclose(desaturated, augment.grayscale(x, tf.fill([4], True)), atol=1e-6)


def test_hue_rotation():
  red = tf.constant([[[[1.0, 0.0, 0.0]]]])
  out = augment.adjust_hue(red, tf.constant([1 / 3])).numpy().ravel()
  np.testing.assert_allclose(out, [0.0, 1.0, 0.0], atol=1e-5)  # Red + 120 degrees = green.
  rgb = np.array([0.2, 0.6, 0.4])
  h, s, v = colorsys.rgb_to_hsv(*rgb)
  expected = colorsys.hsv_to_rgb((h - 0.1) % 1, s, v)
  out = augment.adjust_hue(tf.constant(rgb, tf.float32)[None, None, None], tf.constant([-0.1]))
  np.testing.assert_allclose(out.numpy().ravel(), expected, atol=1e-5)


def _jitter_params(order, apply=True, n=1):
  return {"jitter": tf.fill([n], apply), "order": tf.constant([order] * n, tf.int32),
          "brightness": tf.fill([n], 1.3), "contrast": tf.fill([n], 0.6),
          "saturation": tf.fill([n], 1.4), "hue": tf.fill([n], 0.07)}


def test_color_jitter_applies_each_example_order():
  x = _batch(2, shape=(2, 6, 6, 3))
  ops = {0: lambda y: augment.adjust_brightness(y, tf.fill([1], 1.3)),
         1: lambda y: augment.adjust_contrast(y, tf.fill([1], 0.6)),
         2: lambda y: augment.adjust_saturation(y, tf.fill([1], 1.4)),
         3: lambda y: augment.adjust_hue(y, tf.fill([1], 0.07))}
  orders = [[0, 1, 2, 3], [3, 2, 1, 0]]
  params = _jitter_params(orders[0], n=2)
  params["order"] = tf.constant(orders, tf.int32)
  out = augment.color_jitter(x, params).numpy()
  for i, order in enumerate(orders):
    y = x[i:i + 1]
    for j in order:
      y = ops[j](y)
    np.testing.assert_allclose(out[i], y.numpy()[0], atol=1e-5)
  assert np.abs(out[0] - out[1]).max() > 1e-3  # Images differ: the order matters.
  untouched = augment.color_jitter(x, _jitter_params([0, 1, 2, 3], apply=False, n=2))
  np.testing.assert_array_equal(untouched, x.numpy())


def test_crop_box_within_scale_ratio_and_bounds():
  recipe_scale, ratio = (0.2, 0.6), (3 / 4, 4 / 3)
  boxes = np.stack([augment.sample_crop_box(_key(i), 100, 120, recipe_scale, ratio).numpy()
                    for i in range(200)])
  top, left, h, w = boxes.T
  area = h * w / (100 * 120)
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 100).all() and (left + w <= 120).all()
  assert area.min() >= 0.19 and area.max() <= 0.61  # Rounding moves the area a little.
  assert area.max() - area.min() > 0.3  # It does span the range.
  assert (w / h >= 0.74).all() and (w / h <= 1.35).all()
  np.testing.assert_array_equal(augment.sample_crop_box(_key(3), 100, 120),
                                augment.sample_crop_box(_key(3), 100, 120))


def test_crop_box_fallback_is_centre_crop():
  # No 10:1 crop of at least 90% area fits a square: torchvision falls back to a centre crop
  # with the ratio clamped into range.
  box = augment.sample_crop_box(_key(0), 50, 50, (0.9, 1.0), (10.0, 12.0)).numpy()
  np.testing.assert_array_equal(box, [22, 0, 5, 50])  # top = (50 - 5) // 2.


def test_crop_and_resize_upsamples_small_images():
  image = tf.constant(np.arange(6 * 4 * 3).reshape(6, 4, 3).astype(np.uint8))
  out = augment.crop_and_resize(image, tf.constant([1, 1, 3, 2]), 16)
  assert out.shape == (16, 16, 3) and out.dtype == tf.float32
  assert 0.0 <= out.numpy().min() and out.numpy().max() <= 1.0
  same = augment.crop_and_resize(image, tf.constant([0, 0, 6, 4]), 6)
  assert same.shape == (6, 6, 3)


def test_crop_and_resize_identity_box():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (9, 9, 1)).astype(np.uint8))
  out = augment.crop_and_resize(image, tf.constant([0, 0, 9, 9]), 9).numpy()
  np.testing.assert_allclose(out * 255, image.numpy(), atol=1e-3)
  flipped = augment.crop_and_resize(image, tf.constant([0, 0, 9, 9]), 9, flip=tf.constant(True))
  np.testing.assert_allclose(flipped.numpy() * 255, image.numpy()[:, ::-1], atol=1e-3)


def test_eval_resize_centre_crop():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (20, 40, 3)).astype(np.uint8))
  out = augment.resize_shorter_and_centre_crop(image, 16, 0.8)  # 20 -> 20, crop the centre.
  np.testing.assert_allclose(out.numpy() * 255, image.numpy()[2:18, 12:28], atol=1e-3)
  tiny = augment.resize_shorter_and_centre_crop(image[:5, :7], 16, 1.0)
  assert tiny.shape == (16, 16, 3)


def test_view_params_deterministic_and_probabilities():
  recipe = ViewRecipe(flip_prob=0.5, jitter_prob=0.8, grayscale_prob=0.2, blur_prob=1.0,
                      solarize_prob=0.0)
  same = [augment.sample_view_params(_key(5), recipe, 32, 32) for _ in range(2)]
  for k in same[0]:
    np.testing.assert_array_equal(same[0][k], same[1][k])
  params = tf.data.Dataset.range(800).map(
      lambda i: augment.sample_view_params(tf.stack([tf.constant(1, tf.int64), i]), recipe, 32,
                                           32)).batch(800).get_single_element()
  assert 0.43 < params["flip"].numpy().mean() < 0.57
  assert 0.74 < params["jitter"].numpy().mean() < 0.86
  assert 0.15 < params["grayscale"].numpy().mean() < 0.25
  assert not params["solarize"].numpy().any()
  sigma = params["blur_sigma"].numpy()
  assert sigma.min() >= 0.1 and sigma.max() <= 2.0
  b = params["brightness"].numpy()
  assert b.min() >= 0.6 and b.max() <= 1.4 and b.std() > 0.1
  h = params["hue"].numpy()
  assert h.min() >= -0.1 and h.max() <= 0.1
  orders = params["order"].numpy()
  assert (np.sort(orders, axis=1) == np.arange(4)).all()  # Permutations,
  assert len({tuple(o) for o in orders}) == 24  # and all 24 occur.
  different = augment.sample_view_params(_key(6), recipe, 32, 32)
  assert any(not np.array_equal(same[0][k], different[k]) for k in ("box", "brightness", "hue"))


def test_convert_channels():
  gray = tf.constant(np.arange(4, dtype=np.uint8).reshape(2, 2, 1))
  rgb = augment.convert_channels(gray, 3).numpy()
  assert rgb.shape == (2, 2, 3) and (rgb == gray.numpy()).all()
  assert augment.convert_channels(gray, None) is gray
  color = tf.constant([[[255, 0, 0], [0, 255, 0]]], tf.uint8)
  np.testing.assert_array_equal(augment.convert_channels(color, 1).numpy().ravel(), [76, 150])
  with pytest.raises(ValueError, match="4 channels"):
    augment.convert_channels(tf.zeros([2, 2, 4], tf.uint8), 3)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
  def dynamic(image):
    return augment.convert_channels(image, 3)

  assert dynamic(gray).shape == (2, 2, 3)
  with pytest.raises(tf.errors.InvalidArgumentError, match="cannot be converted"):
    dynamic(tf.zeros([2, 2, 4], tf.uint8))


def test_normalize():
  x = tf.fill([1, 2, 2, 3], 0.5)
  out = augment.normalize(x, (0.5, 0.25, 0.0), (1.0, 0.5, 0.25)).numpy()
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.5, 2.0])


def test_recipe_validation():
  with pytest.raises(ValueError, match="crop_scale"):
    ViewRecipe(crop_scale=(0.5, 0.2))
  with pytest.raises(ValueError, match="blur_prob"):
    ViewRecipe(blur_prob=1.5)


def test_views_params_follow_each_views_recipe():
  always = ViewRecipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0,
                      blur_prob=1.0, solarize_prob=1.0)
  never = ViewRecipe(crop_scale=(0.1, 0.1), flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0,
                     blur_prob=0.0, solarize_prob=0.0)
  for i in range(5):
    p = augment.sample_views_params(_key(i), [always, never, always], 40, 40)
    np.testing.assert_array_equal(p["box"][0], [0, 0, 40, 40])
    assert abs(int(p["box"][1][2]) * int(p["box"][1][3]) / 1600 - 0.1) < 0.02
    np.testing.assert_array_equal(p["flip"], [True, False, True])
    np.testing.assert_array_equal(p["solarize"], [True, False, True])
    assert p["blur_sigma"][0] > 0 and p["blur_sigma"][1] == 0 and not p["jitter"][1]
    assert not np.array_equal(p["blur_sigma"][0], p["blur_sigma"][2])  # Independent draws.


def test_default_config_keys():
  from jaxcontrast.data.config import default_data_config
  cfg = default_data_config()
  for key in ("dataset", "data_dir", "train_split", "eval_split", "image_size", "num_channels",
              "recipe", "num_support_views", "local_crop_sizes", "local_crop_scale",
              "semantic_pairs", "p_semantic", "shuffle_buffer", "prefetch", "cache",
              "eval_crop_ratio", "view1", "view2", "local_view"):
    assert key in cfg, key
  assert cfg.dataset == "fashion_mnist" and cfg.recipe == "mocov2" and cfg.data_dir is None
  cfg.image_size = 64  # Typed placeholders accept values (as command-line flags do).
  cfg.view1.blur_prob = 0.3
  with pytest.raises(TypeError):
    cfg.image_size = "big"


def test_selected_ops_with_nothing_or_everything_selected():
  x = _batch(3, shape=(3, 8, 8, 3))
  none, every = tf.fill([3], False), tf.fill([3], True)
  np.testing.assert_array_equal(augment.gaussian_blur(x, tf.zeros([3])), x)
  np.testing.assert_array_equal(augment.grayscale(x, none), x)
  np.testing.assert_array_equal(augment.solarize(x, none), x)
  assert np.abs(augment.gaussian_blur(x, tf.ones([3])).numpy() - x.numpy()).max() > 0.01
  assert (augment.solarize(x, every).numpy() <= 0.5).all()


def test_crop_and_resize_antialias_switch():
  """Shrinking a 9x9 checkerboard 3x: plain bilinear samples input pixels exactly (half-pixel
  centres land on pixels 1, 4, 7), so every output is 0 or 1; the antialiased shrink averages
  a neighbourhood, so every output lies strictly between."""
  board = (np.indices((9, 9)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
  box = tf.constant([0, 0, 9, 9])
  plain = augment.crop_and_resize(tf.constant(board), box, 3, antialias=False).numpy()
  np.testing.assert_allclose(plain[..., 0], board[1::3, 1::3, 0] / 255.0, atol=1e-6)
  smooth = augment.crop_and_resize(tf.constant(board), box, 3).numpy()
  assert ((smooth > 0.2) & (smooth < 0.8)).all(), smooth[..., 0]
