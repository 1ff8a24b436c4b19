"""The per-batch photometric augmentations of `augment.py` in pure JAX, for the accelerator.

Same formulas and semantics as the TensorFlow ops (torchvision's), driven by the same per-example
parameters (`augment.sample_views_params`, leading dimension B): images are float32 (B, H, W, C)
in [0, 1]; colour jitter -> grayscale -> blur -> solarize, then normalisation. The crop and the
flip stay on the host (`augment.crop_and_resize`); what arrives here is a batch of equally sized
crops, so the train step can run these ops inside its jitted, sharded program.

Differences from the TF versions, all for running under `jax.jit` with the batch sharded:

* No dynamic shapes: the TF ops partition the batch so that each op runs only on the examples
  that drew it; here every op runs on the whole batch and `jnp.where` keeps it where it was drawn.
* Every op is per example (reductions are per image), so a batch sharded over a mesh axis needs
  no communication.
* The blur is k shifted multiply-adds per pass with per-image taps rather than a depthwise
  convolution over B x C features: plain element-wise float32, so no matmul precision setting
  (TF32 on GPU, bf16 passes on TPU) can change it.

This module imports no TensorFlow. Recipes are duck-typed: any object with `jitter_prob`,
`grayscale_prob`, `blur_prob`, `solarize_prob` and `solarize_threshold` (`augment.ViewRecipe`).
"""
import dataclasses
import sys
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcontrast.data import recipes as recipes_lib

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale (augment._LUMA).
_LUMA = tuple(np.float32(w) for w in (0.299, 0.587, 0.114))
# Index of each colour-jitter op in a row of params["order"] (augment.JITTER_OPS).
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
_IDENTITY = 4  # Pseudo-op of the examples that skip colour jitter.
# TF's HSV kernels compute these as float32 quotients (T(1) / T(6), ...).
_SIXTH = np.float32(1) / np.float32(6)
_THIRD = np.float32(2) / np.float32(6)
_TWO_THIRDS = np.float32(4) / np.float32(6)

Params = Mapping[str, Any]


def _per_example(x) -> jax.Array:
  """(B,) -> (B, 1, 1, 1) for broadcasting against images."""
  return jnp.asarray(x, jnp.float32).reshape(-1, 1, 1, 1)


def _luma(images: jax.Array) -> jax.Array:
  """Grayscale with one channel, (..., 3) -> (..., 1): 0.299 R + 0.587 G + 0.114 B."""
  # Summed left to right as TF's 3-element reduction does, rather than jnp.sum's tree.
  r, g, b = images[..., 0:1], images[..., 1:2], images[..., 2:3]
  return r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]


def _gray(images: jax.Array) -> jax.Array:
  """The luma of 3-channel images; 1-channel images are their own grayscale."""
  return _luma(images) if images.shape[-1] == 3 else images


def _clip(x: jax.Array) -> jax.Array:
  return jnp.clip(x, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Colour jitter.
# ---------------------------------------------------------------------------------------------


def adjust_brightness(images: jax.Array, factor) -> jax.Array:
  """torchvision: clip(x * f) with one factor per image (multiplicative)."""
  return _clip(images * _per_example(factor))


def adjust_contrast(images: jax.Array, factor) -> jax.Array:
  """torchvision: clip(x * f + m * (1 - f)), m the mean of the image's grayscale (per image)."""
  f = _per_example(factor)
  return _clip(images * f + _mean_gray(images) * (1.0 - f))


def adjust_saturation(images: jax.Array, factor) -> jax.Array:
  """torchvision: clip(x * f + luma(x) * (1 - f)) per pixel; identity on 1-channel images."""
  if images.shape[-1] != 3:
    return images
  f = _per_example(factor)
  return _clip(images * f + _luma(images) * (1.0 - f))


def _mean_gray(images: jax.Array) -> jax.Array:
  """(B, 1, 1, 1): the mean grayscale value of each image."""
  return jnp.mean(_gray(images), axis=(1, 2, 3), keepdims=True)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """`tf.image.rgb_to_hsv` on (..., 3) in [0, 1]; every output channel in [0, 1].

  v = max(r, g, b), range = v - min(r, g, b), s = range / v (0 where v = 0) and, with
  n = (1 / range) / 6, h = n (g - b) if r = v, else n (b - r) + 1/3 if g = v, else
  n (r - g) + 2/3, then h + 1 where h < 0; h = 0 for grays (range = 0), where it is undefined.
  The branch order (r wins ties, then g) and the arithmetic are TF's kernel's, so hues match it
  to rounding.
  """
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = jnp.maximum(jnp.maximum(r, g), b)
  rng = v - jnp.minimum(jnp.minimum(r, g), b)
  # Safe divisors: the quotients they stand in for are discarded by the selects (no inf / NaN
  # even in the unused branch, which keeps NaN checkers quiet).
  s = jnp.where(v > 0, rng / jnp.where(v > 0, v, 1.0), 0.0)
  norm = (1.0 / jnp.where(rng > 0, rng, 1.0)) * _SIXTH
  h = jnp.where(r == v, norm * (g - b),
                jnp.where(g == v, norm * (b - r) + _THIRD, norm * (r - g) + _TWO_THIRDS))
  h = jnp.where(rng > 0, h, 0.0)
  h = jnp.where(h < 0, h + 1.0, h)
  return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """`tf.image.hsv_to_rgb`: with d = 6 h, channel = (1 - s + s * c) * v where
  c_r = clip(|d - 3| - 1), c_g = clip(2 - |d - 2|), c_b = clip(2 - |d - 4|), clip to [0, 1]."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  dh = h * 6.0
  dr = _clip(jnp.abs(dh - 3.0) - 1.0)
  dg = _clip(2.0 - jnp.abs(dh - 2.0))
  db = _clip(2.0 - jnp.abs(dh - 4.0))
  one_s = 1.0 - s
  return jnp.stack([(one_s + s * dr) * v, (one_s + s * dg) * v, (one_s + s * db) * v], axis=-1)


def adjust_hue(images: jax.Array, delta) -> jax.Array:
  """Rotates the hue by `delta` (fraction of the circle, per image): h -> (h + delta) mod 1 in
  HSV, back to RGB, clipped. Identity on 1-channel images."""
  if images.shape[-1] != 3:
    return images
  hsv = rgb_to_hsv(images)
  hue = jnp.mod(hsv[..., :1] + _per_example(delta), 1.0)
  return _clip(hsv_to_rgb(jnp.concatenate([hue, hsv[..., 1:]], axis=-1)))


def color_jitter(images: jax.Array, params: Params) -> jax.Array:
  """Brightness, contrast, saturation and hue in each example's own order, clipped after each.

  `params["order"]` (B, 4) int is a permutation of (brightness, contrast, saturation, hue) per
  example; examples whose `params["jitter"]` is False are returned unchanged (bitwise).

  At each of the 4 positions every example needs a different op, and jit allows no per-example
  branching on values: `vmap` of a `lax.switch` would lower to computing all 4 branches on the
  whole batch and selecting, and partitioning the batch by op (as the TF version does) needs
  dynamic shapes. So the select is explicit, and made cheap: brightness, contrast and saturation
  are one blend clip(x * f + ref * (1 - f)) with per-example f and ref (0, the image's mean
  luma, the pixel's luma: the TF formulas term for term, brightness's ref * (1 - f) being an
  exact 0), so a position costs one blend, one hue rotation and a select. The hue rotation
  (rgb -> hsv -> rgb, the costliest op, still elementwise) is thus computed 4 times per example
  where 1 is needed; skipping it where no example of the batch needs it would need a reduction
  over the (sharded) batch.
  """
  three = images.shape[-1] == 3
  brightness, contrast, saturation = (jnp.asarray(params[k], jnp.float32)
                                      for k in ("brightness", "contrast", "saturation"))
  which_all = jnp.where(jnp.asarray(params["jitter"])[:, None],
                        jnp.asarray(params["order"], jnp.int32), _IDENTITY)  # (B, 4)
  delta = jnp.asarray(params["hue"], jnp.float32)
  out = images
  for position in range(4):
    which = which_all[:, position]
    op = which.reshape(-1, 1, 1, 1)
    f = _per_example(jnp.where(which == _BRIGHTNESS, brightness,
                               jnp.where(which == _CONTRAST, contrast, saturation)))
    ref = jnp.where(op == _CONTRAST, _mean_gray(out), 0.0)
    if three:
      ref = jnp.where(op == _SATURATION, _luma(out), ref)
    blended = _clip(out * f + ref * (1.0 - f))
    # Identities: no jitter, and on 1-channel images saturation and hue.
    keep = (op == _IDENTITY) if three else (op >= _SATURATION)
    new = jnp.where(keep, out, blended)
    if three:
      new = jnp.where(op == _HUE, adjust_hue(out, delta), new)
    out = new
  return out


# ---------------------------------------------------------------------------------------------
# Grayscale, blur, solarize, normalisation.
# ---------------------------------------------------------------------------------------------


def grayscale(images: jax.Array, apply) -> jax.Array:
  """Replaces the selected images (bool (B,)) by their luma replicated over the 3 channels;
  identity on 1-channel images."""
  if images.shape[-1] != 3:
    return images
  gray = jnp.broadcast_to(_luma(images), images.shape)
  return jnp.where(jnp.asarray(apply).reshape(-1, 1, 1, 1), gray, images)


def blur_kernel_size(side: int) -> int:
  """Odd kernel size about 10% of the image side (BYOL: 23 for 224), at least 3."""
  return max(3, int(round(0.1 * side)) | 1)


def gaussian_taps(sigma, kernel_size: int) -> jax.Array:
  """(B, k) normalised Gaussian taps: g_d = exp(-(d / sigma)^2 / 2) / sum_d', d in [-k//2, k//2].

  sigma <= 0 rows are finite (sigma is floored at 1e-6, as in TF) and meant to be discarded.
  """
  radius = kernel_size // 2
  d = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  safe = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-6)[:, None]
  taps = jnp.exp(-0.5 * jnp.square(d[None, :] / safe))
  return taps / jnp.sum(taps, axis=1, keepdims=True)


def gaussian_blur(images: jax.Array, sigma, kernel_size: int | None = None) -> jax.Array:
  """Separable Gaussian blur with a per-image sigma (B,); sigma <= 0 leaves the image unchanged
  (bitwise).

  k = `kernel_size` or blur_kernel_size(min(H, W)) normalised taps g (`gaussian_taps`), reflect
  padding (torchvision's GaussianBlur; numpy 'reflect': the edge is not repeated), horizontal
  then vertical: out[v] = sum_d g_d x[reflect(v + d)], as k shifted multiply-adds per pass.
  Element-wise float32 work (2 k B H W C multiply-adds, 3.6 GFLOP for 256 images of 224 x 224 x
  3), no matrix product: nothing here depends on the matmul precision (TF32 on GPU, bf16 passes
  on TPU). Measured on 2 CPU cores, 256 x 224 x 224 x 3: 615 ms, against 1,294 ms for per-image
  banded matrices with the padding folded in (the same result to 4e-7).

  Raises:
    ValueError: the kernel radius is not smaller than the image's sides.
  """
  _, h, w, _ = images.shape
  k = kernel_size or blur_kernel_size(min(h, w))
  radius = k // 2
  if radius >= min(h, w):
    raise ValueError(f"Blur kernel {k} too large for a {(h, w)} image")
  sigma = jnp.asarray(sigma, jnp.float32)
  taps = gaussian_taps(sigma, k)

  def one_pass(x, axis):
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    out = taps[:, 0].reshape(-1, 1, 1, 1) * jax.lax.slice_in_dim(padded, 0, n, axis=axis)
    for i in range(1, k):
      out = out + taps[:, i].reshape(-1, 1, 1, 1) * jax.lax.slice_in_dim(padded, i, i + n,
                                                                          axis=axis)
    return out

  out = one_pass(one_pass(images, 2), 1)
  return jnp.where((sigma > 0).reshape(-1, 1, 1, 1), out, images)


def solarize(images: jax.Array, apply, threshold: float = 0.5) -> jax.Array:
  """torchvision's solarize on the selected images (bool (B,)): x >= threshold -> 1 - x."""
  flip = jnp.asarray(apply).reshape(-1, 1, 1, 1) & (images >= threshold)
  return jnp.where(flip, 1.0 - images, images)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """(x - mean) / std per channel."""
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ---------------------------------------------------------------------------------------------
# A view's ops.
# ---------------------------------------------------------------------------------------------


def apply_view_params(images: jax.Array, params: Params, recipe: Any) -> jax.Array:
  """A view's photometric ops on a batch of crops, in torchvision/MoCo order (as
  `augment.apply_view_params`): colour jitter -> grayscale -> blur -> solarize.

  `params` as from `augment.sample_views_params` (leading dimension B; "box" and "flip" are
  ignored: the host applies them). Ops whose probability in `recipe` is 0 are left out of the
  program. Returns float32 in [0, 1]; normalisation is separate.
  """
  return recipes_lib.apply_photometric(images, params, recipe, sys.modules[__name__])


def augment_views(images: jax.Array, params: Params, recipe: Any, mean: Sequence[float],
                  std: Sequence[float]) -> jax.Array:
  """uint8 crops (B, H, W, C) -> float32 x / 255 -> `apply_view_params` -> `normalize`.

  What the train step calls on each view: the host ships uint8 crops (4 x less to transfer than
  float32) and the per-example params, and the rest happens on the accelerator.
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return normalize(apply_view_params(x, params, recipe), mean, std)


# ---------------------------------------------------------------------------------------------
# The train step's entry: a batch with uint8 views and their params.
# ---------------------------------------------------------------------------------------------

# The per-example parameters the host ships with each uint8 view (`batch["aug"][view]`), as
# drawn by `augment.sample_views_params` (crop box and flip are applied on the host).
PARAM_KEYS = ("jitter", "brightness", "contrast", "saturation", "hue", "order", "grayscale",
              "blur_sigma", "solarize")


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
  """What the train step needs to finish the views on the accelerator (`data.augment_on =
  "device"`): each view kind's recipe and the normalisation statistics. Hashable (a static part
  of the compiled step). Built by `data.pipeline.device_augment(data_config)`, or from the
  recipes (`data.recipes.view_recipes`) and statistics where TensorFlow is absent.

  recipes: ((kind, recipe), ...) for "view1", "view2", "support", "local_i".
  """
  recipes: tuple[tuple[str, Any], ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @classmethod
  def create(cls, recipes: Mapping[str, Any], mean, std) -> "DeviceAugment":
    return cls(tuple(sorted(recipes.items())), tuple(map(float, mean)), tuple(map(float, std)))

  def __call__(self, batch: Mapping[str, Any], *, defer: Sequence[str] = ()) -> dict:
    """The batch with every view in `batch["aug"]` (uint8 (B, H, W, C); "support" (B, S, H, W,
    C)) replaced by its float32 normalised augmentation, "aug" dropped, the rest unchanged.
    Views named in `defer` stay uint8, their parameters kept under "aug" (finish them later with
    `view`, e.g. after a permutation: 4 x fewer bytes to move than float32)."""
    out = {k: v for k, v in batch.items() if k != "aug"}
    deferred = {}
    for name, params in batch["aug"].items():
      if name in defer:
        deferred[name] = params
      else:
        out[name] = self.view(name, batch[name], params)
    if deferred:
      out["aug"] = deferred
    return out

  def view(self, name: str, images: jax.Array, params: Params) -> jax.Array:
    """One view's uint8 crops (B, H, W, C) or (B, S, H, W, C) and per-example params (leading
    dims the same) -> float32 normalised views (`augment_views` with the view's recipe)."""
    recipes = dict(self.recipes)
    if name not in recipes:
      raise ValueError(f"batch['aug'] has view {name!r}, which has no recipe; known: "
                       f"{sorted(recipes)}")
    if images.dtype != jnp.uint8:
      raise ValueError(f"device augmentation expects uint8 {name!r}, got {images.dtype}")
    # Support views (B, S, ...) are S more views of each example with one recipe: flatten.
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    flat_params = {k: jnp.reshape(params[k], (flat.shape[0], *params[k].shape[len(lead):]))
                   for k in PARAM_KEYS}
    views = augment_views(flat, flat_params, recipes[name], self.mean, self.std)
    return views.reshape(*lead, *views.shape[1:])


def random_params(rng: np.random.Generator, lead: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Plausible per-example parameters (every op drawn about half the time) for benchmarks on
  synthetic batches: the pixel work is the same whatever the values."""
  u = lambda: rng.uniform(size=lead).astype(np.float32)
  return {"jitter": u() < 0.8, "brightness": 0.6 + 0.8 * u(), "contrast": 0.6 + 0.8 * u(),
          "saturation": 0.6 + 0.8 * u(), "hue": 0.2 * u() - 0.1,
          "order": np.argsort(rng.uniform(size=(*lead, 4)), axis=-1).astype(np.int32),
          "grayscale": u() < 0.2,
          "blur_sigma": np.where(u() < 0.5, 0.1 + 1.9 * u(), 0.0).astype(np.float32),
          "solarize": u() < 0.2}
