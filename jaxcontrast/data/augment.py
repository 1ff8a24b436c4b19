"""Image augmentations as TensorFlow ops, driven by explicit per-example parameters.

Two halves, so that randomness is per example but pixel work is batched:

* `sample_view_params(key, recipe, height, width)` draws every random choice of one view of one
  example (crop box, flip, colour-jitter factors and order, grayscale, blur sigma, solarize) from
  a stateless seed with `tf.random.stateless_*`. The pipeline derives the seed from
  (seed, epoch, example id), so an example's views do not depend on batch composition, shuffle
  order or the number of processes.
* `crop_and_resize` (one example: images may differ in size before cropping) and
  `apply_view_params` (a batch of equally sized crops) apply those choices.

Pixel values are float32 in [0, 1] from the crop until `normalize`. Semantics follow torchvision
(what MoCo, SCE and BYOL's PyTorch ports use): multiplicative brightness, contrast around the
grayscale mean, saturation as a blend with grayscale, hue as a rotation in HSV, the four applied
in a random order per example; ITU-R 601-2 luma grayscale; RandomResizedCrop's sampling.
Single-channel images skip saturation, hue and grayscale, which are identities on them.
"""
import functools
import sys
from typing import Mapping

import tensorflow as tf

from jaxcontrast.data import recipes as recipes_lib
# The knobs of a view; defined TF-free in recipes.py, re-exported here.
from jaxcontrast.data.recipes import ViewRecipe  # pylint: disable=unused-import

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# RandomResizedCrop tries this many (area, ratio) draws before falling back to a centre crop.
_CROP_ATTEMPTS = 10
# Colour-jitter ops, in the order of their index in a permutation (torchvision's order).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


# ---------------------------------------------------------------------------------------------
# Channels and crops (one example at a time).
# ---------------------------------------------------------------------------------------------


def convert_channels(image: tf.Tensor, num_channels: int | None) -> tf.Tensor:
  """Returns `image` (H, W, C) with `num_channels` channels.

  None keeps the image as is; 1 -> 3 replicates the gray channel; 3 -> 1 takes the luma. Any
  other combination is an error: statically (ValueError) when C is known, else at run time
  (tf.errors.InvalidArgumentError) with the same message.
  """
  if num_channels is None:
    return image
  if num_channels not in (1, 3):
    raise ValueError(f"num_channels must be None, 1 or 3, got {num_channels}")
  channels = image.shape[-1]
  if channels is not None:
    if channels == num_channels:
      return image
    if channels == 1:
      return tf.tile(image, [1, 1, 3])
    if channels == 3:
      return tf.cast(tf.round(_luma(tf.cast(image, tf.float32))), image.dtype)
    raise ValueError(f"Image has {channels} channels; cannot convert it to {num_channels} "
                     "(supported: 1 -> 3, 3 -> 1, or num_channels=None to keep).")
  # Unknown static channel count: decide at run time.
  dynamic = tf.shape(image)[-1]
  check = tf.debugging.assert_equal(
      tf.logical_or(tf.equal(dynamic, 1), tf.equal(dynamic, 3)), True,
      message=f"Image channel count cannot be converted to {num_channels} "
              "(supported: 1 -> 3, 3 -> 1, or num_channels=None to keep).")
  with tf.control_dependencies([check]):
    image = tf.identity(image)
  if num_channels == 3:
    out = tf.cond(tf.equal(dynamic, 1), lambda: tf.tile(image, [1, 1, 3]), lambda: image)
  else:
    out = tf.cond(tf.equal(dynamic, 3),
                  lambda: tf.cast(tf.round(_luma(tf.cast(image, tf.float32))), image.dtype),
                  lambda: image)
  return tf.ensure_shape(out, [None, None, num_channels])


def _crop_boxes(u: tf.Tensor, height, width, scale: tf.Tensor, ratio: tf.Tensor) -> tf.Tensor:
  """torchvision's RandomResizedCrop.get_params for V views at once: int32 (V, 4).

  Args:
    u: float32 (V, 2 * _CROP_ATTEMPTS + 2) uniforms in [0, 1).
    height, width: image size (scalars).
    scale, ratio: float32 (V, 2) ranges of each view.

  Up to 10 draws of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); the first one
  that fits the image wins; otherwise a centre crop with the ratio clamped to the range.
  Rows are [top, left, h, w].
  """
  height = tf.cast(height, tf.float32)
  width = tf.cast(width, tf.float32)
  n = _CROP_ATTEMPTS
  area = height * width * (scale[:, :1] + u[:, :n] * (scale[:, 1:] - scale[:, :1]))
  log_lo, log_hi = tf.math.log(ratio[:, :1]), tf.math.log(ratio[:, 1:])
  aspect = tf.exp(log_lo + u[:, n:2 * n] * (log_hi - log_lo))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (V, n)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)  # 0 if none fits.
  crop_h = tf.gather(h, first, batch_dims=1)
  crop_w = tf.gather(w, first, batch_dims=1)
  # Centre-crop fallback (torchvision): clamp the image's own ratio into the range.
  in_ratio = width / height
  lo, hi = ratio[:, 0], ratio[:, 1]
  fb_w = tf.where(in_ratio > hi, tf.round(height * hi), width)
  fb_h = tf.where(in_ratio < lo, tf.round(width / lo), height)
  fb_w = tf.where(in_ratio < lo, width, fb_w)
  any_fits = tf.reduce_any(fits, axis=1)
  crop_h = tf.where(any_fits, crop_h, fb_h)
  crop_w = tf.where(any_fits, crop_w, fb_w)
  top = tf.minimum(tf.floor(u[:, 2 * n] * (height - crop_h + 1)), height - crop_h)
  left = tf.minimum(tf.floor(u[:, 2 * n + 1] * (width - crop_w + 1)), width - crop_w)
  top = tf.where(any_fits, top, tf.floor((height - crop_h) / 2))
  left = tf.where(any_fits, left, tf.floor((width - crop_w) / 2))
  return tf.cast(tf.stack([top, left, crop_h, crop_w], axis=1), tf.int32)


def sample_crop_box(key: tf.Tensor, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
                    ) -> tf.Tensor:
  """One RandomResizedCrop box from stateless seed `key`: int32 [top, left, h, w]."""
  u = tf.random.stateless_uniform([1, 2 * _CROP_ATTEMPTS + 2], key)
  return _crop_boxes(u, height, width, tf.constant([scale], tf.float32),
                     tf.constant([ratio], tf.float32))[0]


def crop_and_resize(image: tf.Tensor, box: tf.Tensor, size: int, flip=None,
                    antialias: bool = True) -> tf.Tensor:
  """Crops `box` = [top, left, h, w] from uint8 (H, W, C) and resizes to float (size, size, C).

  Bilinear with antialiasing (as PIL, hence torchvision's RandomResizedCrop, when shrinking); a
  crop smaller than `size` is upsampled. `antialias=False` is plain bilinear sampling (as
  big_vision's inception crop): cheaper when crops are much larger than `size` (measured on
  375x500 JPEGs -> 224, two views, 2 cores: 80 vs 113 images/s; benchmarks/bench_data.py).
  `flip` (bool scalar) mirrors the crop horizontally: done here, per example, because every
  later op commutes with it (pointwise ops, whole-image means, symmetric blur kernels with
  reflect padding), and one conditional reverse is cheaper than a batched select.
  The output is float32 in [0, 1].
  """
  crop = tf.slice(image, [box[0], box[1], 0], [box[2], box[3], -1])
  out = tf.image.resize(tf.cast(crop, tf.float32), [size, size], method="bilinear",
                        antialias=antialias)
  out = tf.clip_by_value(out / 255.0, 0.0, 1.0)
  if flip is not None:
    out = tf.cond(flip, lambda: tf.reverse(out, axis=[1]), lambda: out)
  return out


def resize_shorter_and_centre_crop(image: tf.Tensor, size: int, crop_ratio: float) -> tf.Tensor:
  """Evaluation transform: shorter side -> round(size / crop_ratio), centre crop size x size.

  Returns float32 in [0, 1]. Images smaller than the target are upsampled.
  """
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  resize_to = tf.round(size / crop_ratio)
  scale = resize_to / tf.reduce_min(shape)
  new_hw = tf.cast(tf.maximum(tf.round(shape * scale), float(size)), tf.int32)
  out = tf.image.resize(tf.cast(image, tf.float32), new_hw, method="bilinear", antialias=True)
  top = (new_hw[0] - size) // 2
  left = (new_hw[1] - size) // 2
  out = tf.slice(out, [top, left, 0], [size, size, -1])
  out = tf.ensure_shape(out, [size, size, image.shape[-1]])
  return tf.clip_by_value(out / 255.0, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Parameters of one view of one example.
# ---------------------------------------------------------------------------------------------


# Columns of the uniforms drawn per view: crop box first, then the photometric choices.
_CROP_COLUMNS = 2 * _CROP_ATTEMPTS + 2
_PHOTO_COLUMNS = 14  # flip, jitter, 4 factors, 4 order keys, grayscale, blur, sigma, solarize.


def _column(values, dtype=tf.float32) -> tf.Tensor:
  return tf.constant(values, dtype)


def sample_views_params(key: tf.Tensor, recipes: list[ViewRecipe], height, width
                        ) -> dict[str, tf.Tensor]:
  """Draws every random choice of V views of one image from stateless seed `key` (shape [2]).

  One `stateless_uniform` call draws all V x 36 numbers (few ops per example: per-example
  work in tf.data is dominated by op count, not arithmetic). Returns tensors with leading
  dimension V: box int32 (V, 4); flip, jitter, grayscale, solarize bool (V,); brightness,
  contrast, saturation, hue float32 (V,); order int32 (V, 4), a permutation of JITTER_OPS;
  blur_sigma float32 (V,), 0 = no blur.
  """
  v = len(recipes)
  u = tf.random.stateless_uniform([v, _CROP_COLUMNS + _PHOTO_COLUMNS], key)
  col = lambda name: _column([getattr(r, name) for r in recipes])
  box = _crop_boxes(u[:, :_CROP_COLUMNS], height, width, col("crop_scale"), col("crop_ratio"))
  p = u[:, _CROP_COLUMNS:]

  def factor(j, name):
    strength = col(name)
    lo = tf.maximum(0.0, 1.0 - strength)
    return lo + p[:, j] * (1.0 + strength - lo)

  sigma_lo, sigma_hi = col("blur_sigma")[:, 0], col("blur_sigma")[:, 1]
  sigma = sigma_lo + p[:, 12] * (sigma_hi - sigma_lo)
  return {
      "box": box,
      "flip": p[:, 0] < col("flip_prob"),
      "jitter": p[:, 1] < col("jitter_prob"),
      "brightness": factor(2, "brightness"),
      "contrast": factor(3, "contrast"),
      "saturation": factor(4, "saturation"),
      "hue": (2.0 * p[:, 5] - 1.0) * col("hue"),
      "order": tf.argsort(p[:, 6:10], axis=1, stable=True),
      "grayscale": p[:, 10] < col("grayscale_prob"),
      "blur_sigma": tf.where(p[:, 11] < col("blur_prob"), sigma, 0.0),
      "solarize": p[:, 13] < col("solarize_prob"),
  }


def sample_view_params(key: tf.Tensor, recipe: ViewRecipe, height, width
                       ) -> dict[str, tf.Tensor]:
  """`sample_views_params` for a single view: the same entries without the leading V."""
  return {k: v[0] for k, v in sample_views_params(key, [recipe], height, width).items()}


# ---------------------------------------------------------------------------------------------
# Batched pixel ops: images (B, H, W, C) float32 in [0, 1], per-example parameters (B,).
# ---------------------------------------------------------------------------------------------


def _per_example(x: tf.Tensor) -> tf.Tensor:
  """(B,) -> (B, 1, 1, 1) for broadcasting against images."""
  return tf.reshape(tf.cast(x, tf.float32), [-1, 1, 1, 1])


def _luma(images: tf.Tensor) -> tf.Tensor:
  """Grayscale with one channel: (..., 3) -> (..., 1)."""
  return tf.reduce_sum(images * tf.constant(_LUMA, images.dtype), axis=-1, keepdims=True)


def adjust_brightness(images, factor):
  """torchvision: x * factor, clipped (multiplicative, unlike tf.image.adjust_brightness)."""
  return tf.clip_by_value(images * _per_example(factor), 0.0, 1.0)


def adjust_contrast(images, factor):
  """torchvision: blend with the mean of the image's grayscale (one scalar per image)."""
  gray = _luma(images) if images.shape[-1] == 3 else images
  mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
  f = _per_example(factor)
  return tf.clip_by_value(images * f + mean * (1.0 - f), 0.0, 1.0)


def adjust_saturation(images, factor):
  """torchvision: blend with the grayscale image; identity on 1-channel images."""
  if images.shape[-1] != 3:
    return images
  f = _per_example(factor)
  return tf.clip_by_value(images * f + _luma(images) * (1.0 - f), 0.0, 1.0)


def adjust_hue(images, delta):
  """Rotates the hue by `delta` (fraction of the circle) per image; identity on 1 channel."""
  if images.shape[-1] != 3:
    return images
  hsv = tf.image.rgb_to_hsv(images)
  hue = tf.math.floormod(hsv[..., :1] + _per_example(delta), 1.0)
  return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)), 0.0, 1.0)


def color_jitter(images, params: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """Brightness, contrast, saturation and hue in each example's own random order.

  `params["order"]` (B, 4) is a permutation of JITTER_OPS per example; examples whose
  `params["jitter"]` is False are left untouched. At each of the 4 positions, the batch is
  partitioned by which op comes there, each op runs on its part only, and the parts are
  stitched back: 4 op applications per example, not 16.
  """
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  factors = [params[name] for name in JITTER_OPS]
  static_shape = images.shape
  index = tf.range(tf.shape(images)[0])
  for position in range(4):
    # Group 4 = jitter not applied to this example.
    which = tf.where(params["jitter"], params["order"][:, position], 4)
    parts = tf.dynamic_partition(images, which, 5)
    indices = tf.dynamic_partition(index, which, 5)
    outs = [op(parts[j], tf.gather(factors[j], indices[j])) for j, op in enumerate(ops)]
    outs.append(parts[4])
    images = tf.dynamic_stitch(indices, outs)
    images.set_shape(static_shape)
  return images


def _on_selected(images, apply, fn, *args) -> tf.Tensor:
  """fn(selected images, *args gathered for them) on the images where `apply` is True.

  Partitions the batch, so an op drawn with probability p costs p of the batched op (plus a
  copy), not the whole batch followed by a select.
  """
  static_shape = images.shape
  which = tf.cast(apply, tf.int32)
  index = tf.range(tf.shape(images)[0])
  parts = tf.dynamic_partition(images, which, 2)
  indices = tf.dynamic_partition(index, which, 2)
  selected_args = [tf.gather(a, indices[1]) for a in args]
  done = tf.cond(tf.size(indices[1]) > 0, lambda: fn(parts[1], *selected_args),
                 lambda: parts[1])  # Some ops (mirror padding) reject empty batches.
  out = tf.dynamic_stitch(indices, [parts[0], done])
  out.set_shape(static_shape)
  return out


def grayscale(images, apply) -> tf.Tensor:
  """Replaces the selected images by their luma, replicated over the channels."""
  if images.shape[-1] != 3:
    return images
  return _on_selected(images, apply, lambda x: tf.tile(_luma(x), [1, 1, 1, 3]))


def blur_kernel_size(side: int) -> int:
  """Odd kernel size about 10% of the image side (BYOL: 23 for 224), at least 3."""
  return max(3, int(round(0.1 * side)) | 1)


def gaussian_blur(images, sigma, kernel_size: int | None = None) -> tf.Tensor:
  """Separable Gaussian blur with a per-image sigma (B,); sigma <= 0 leaves the image as is.

  Reflect padding, as torchvision's GaussianBlur. Only the images with sigma > 0 are blurred.
  """
  return _on_selected(images, sigma > 0, functools.partial(_blur, kernel_size=kernel_size),
                      sigma)


def _blur(images, sigma, kernel_size: int | None = None) -> tf.Tensor:
  """`gaussian_blur` of every image: the per-image kernels run as one depthwise convolution
  over a (1, H, W, B * C) tensor."""
  b, h, w, c = (tf.shape(images)[i] if images.shape[i] is None else images.shape[i]
                for i in range(4))
  k = kernel_size or blur_kernel_size(min(images.shape[1], images.shape[2]))
  radius = k // 2
  if radius >= min(images.shape[1], images.shape[2]):
    raise ValueError(f"Blur kernel {k} too large for a {images.shape[1:3]} image")
  sigma = tf.cast(sigma, tf.float32)
  d = tf.range(-radius, radius + 1, dtype=tf.float32)
  safe = tf.maximum(sigma, 1e-6)[:, None]
  kernel = tf.exp(-0.5 * tf.square(d[None, :] / safe))
  kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)
  delta = tf.one_hot(radius, k, dtype=tf.float32)[None, :]
  kernel = tf.where((sigma > 0)[:, None], kernel, delta)  # (B, k)
  kernel = tf.reshape(tf.repeat(kernel, c, axis=0), [b * c, k])  # Row b * C + ch.
  x = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, h, w, b * c])
  x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
  horizontal = tf.reshape(tf.transpose(kernel), [1, k, b * c, 1])
  vertical = tf.reshape(tf.transpose(kernel), [k, 1, b * c, 1])
  x = tf.nn.depthwise_conv2d(x, horizontal, [1, 1, 1, 1], "VALID")
  x = tf.nn.depthwise_conv2d(x, vertical, [1, 1, 1, 1], "VALID")
  return tf.transpose(tf.reshape(x, [h, w, b, c]), [2, 0, 1, 3])


def solarize(images, apply, threshold: float = 0.5) -> tf.Tensor:
  """Inverts values >= threshold in the selected images (torchvision's solarize)."""
  return _on_selected(images, apply, lambda x: tf.where(x >= threshold, 1.0 - x, x))


def flip_left_right(images, apply) -> tf.Tensor:
  """Mirrors the selected images horizontally."""
  return tf.where(tf.reshape(apply, [-1, 1, 1, 1]), tf.reverse(images, axis=[2]), images)


def normalize(images, mean, std) -> tf.Tensor:
  """(x - mean) / std per channel."""
  return (images - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def apply_view_params(images: tf.Tensor, params: Mapping[str, tf.Tensor],
                      recipe: ViewRecipe) -> tf.Tensor:
  """Applies a view's photometric ops to a batch of crops, in torchvision/MoCo order.

  colour jitter -> grayscale -> blur -> solarize. The flip is not applied here: it commutes
  with all of these and `crop_and_resize(..., flip=params["flip"])` does it per example.
  Ops whose probability is 0 in `recipe` are skipped at trace time (less work per batch).
  Returns float32 in [0, 1]; normalisation is separate.
  """
  return recipes_lib.apply_photometric(images, params, recipe, sys.modules[__name__])
