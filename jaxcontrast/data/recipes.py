"""Named augmentation recipes (METHODS.md §1, §2, §5, §6) and their per-view overrides.

A recipe is a pair of `ViewRecipe`s: view 1 feeds the ONLINE (query) branch, view 2 the TARGET
(key) branch. The other views derive from them:

* FNC support views (METHODS §5) use view 2's recipe: they are embedded by the target encoder,
  like the key view.
* Multi-crop local views use view 1's recipe with their own crop scale (`local_crop_scale`: one
  range for all, or one per crop) and the `local_view` overrides: they go through the online
  branch, as in SwAV and SCE's multi-crop.
* SePP (§6) changes which image view 2 is cut from, not how: any recipe works.

Any knob of any view can be overridden from the config (`config.view1.blur_prob = 0.3`, ...).
No TensorFlow here: the train step reads the recipes when the photometric ops run on the
accelerator (`data.augment_on = "device"`), on machines that may have no TensorFlow.
"""
import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class ViewRecipe:
  """The augmentation knobs of one view (torchvision names and ranges)."""
  crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction range.
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range.
  flip_prob: float = 0.5  # Horizontal flip probability.
  jitter_prob: float = 0.8  # Probability of applying colour jitter at all.
  brightness: float = 0.4  # Factor drawn from [max(0, 1 - b), 1 + b].
  contrast: float = 0.4  # Factor drawn from [max(0, 1 - c), 1 + c].
  saturation: float = 0.4  # Factor drawn from [max(0, 1 - s), 1 + s].
  hue: float = 0.1  # Hue shift drawn from [-h, h] (fraction of the colour circle, <= 0.5).
  grayscale_prob: float = 0.2  # Probability of converting to grayscale (channels kept).
  blur_prob: float = 0.5  # Probability of a Gaussian blur.
  blur_sigma: tuple[float, float] = (0.1, 2.0)  # Blur sigma range, in pixels of the crop.
  solarize_prob: float = 0.0  # Probability of solarizing.
  solarize_threshold: float = 0.5  # Values >= threshold (in [0, 1]) are inverted.

  def __post_init__(self):
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
    lo, hi = self.crop_ratio
    if not 0 < lo <= hi:
      raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
    for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
    if min(self.brightness, self.contrast, self.saturation) < 0:
      raise ValueError("brightness, contrast and saturation must be >= 0")
    lo, hi = self.blur_sigma
    if not 0 < lo <= hi:
      raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")


def photometric_ops(recipe: ViewRecipe) -> tuple[str, ...]:
  """The photometric ops a view applies, in torchvision / MoCo order: "jitter" -> "grayscale"
  -> "blur" -> "solarize", without those of probability 0 (left out of the traced program).
  The one order both implementations follow (augment.py on the host, augment_jax.py in the
  train step)."""
  probs = (("jitter", recipe.jitter_prob), ("grayscale", recipe.grayscale_prob),
           ("blur", recipe.blur_prob), ("solarize", recipe.solarize_prob))
  return tuple(name for name, p in probs if p > 0)


def apply_photometric(images, params: Mapping[str, Any], recipe: ViewRecipe, ops):
  """`photometric_ops(recipe)` applied to a batch with per-example `params`, by `ops`: the
  module whose color_jitter / grayscale / gaussian_blur / solarize implement them (augment for
  TensorFlow on the host, augment_jax for JAX in the train step)."""
  for name in photometric_ops(recipe):
    if name == "jitter":
      images = ops.color_jitter(images, params)
    elif name == "grayscale":
      images = ops.grayscale(images, params["grayscale"])
    elif name == "blur":
      images = ops.gaussian_blur(images, params["blur_sigma"])
    else:
      images = ops.solarize(images, params["solarize"], recipe.solarize_threshold)
  return images


# MoCo v2 (facebookresearch/moco main_moco.py, --aug-plus): both views the same.
_MOCOV2 = ViewRecipe(crop_scale=(0.2, 1.0), flip_prob=0.5, jitter_prob=0.8, brightness=0.4,
                     contrast=0.4, saturation=0.4, hue=0.1, grayscale_prob=0.2, blur_prob=0.5,
                     blur_sigma=(0.1, 2.0))
# MoCo's CIFAR-10 demo: MoCo v2 without blur (32x32 images). Note: the PyTorch demo notebook
# calls RandomResizedCrop(32) with torchvision's default scale (0.08, 1) as far as we know
# (unverified); we keep MoCo v2's (0.2, 1) as specified; override view1/view2.crop_scale.
_MOCOV2_CIFAR = dataclasses.replace(_MOCOV2, blur_prob=0.0)
# SCE ImageNet = BYOL's augmentations: RRC (0.08, 1), jitter (0.4, 0.4, 0.2, 0.1) p=0.8,
# grayscale 0.2; view 1 blur p=1.0, view 2 blur p=0.1 and solarize p=0.2.
_BYOL = ViewRecipe(crop_scale=(0.08, 1.0), flip_prob=0.5, jitter_prob=0.8, brightness=0.4,
                   contrast=0.4, saturation=0.2, hue=0.1, grayscale_prob=0.2,
                   blur_sigma=(0.1, 2.0))
_SCE_IMAGENET_1 = dataclasses.replace(_BYOL, blur_prob=1.0, solarize_prob=0.0)
_SCE_IMAGENET_2 = dataclasses.replace(_BYOL, blur_prob=0.1, solarize_prob=0.2)
# SCE CIFAR: strong view (online) = MoCo CIFAR's; weak view (target) = crop + flip only.
_WEAK = ViewRecipe(crop_scale=(0.2, 1.0), flip_prob=0.5, jitter_prob=0.0, grayscale_prob=0.0,
                   blur_prob=0.0, solarize_prob=0.0)
# SimCLR (FNC's official code builds on it): jitter strength 1.0, blur p=0.5, RRC (0.08, 1).
_SIMCLR = ViewRecipe(crop_scale=(0.08, 1.0), flip_prob=0.5, jitter_prob=0.8, brightness=0.8,
                     contrast=0.8, saturation=0.8, hue=0.2, grayscale_prob=0.2, blur_prob=0.5,
                     blur_sigma=(0.1, 2.0))

# name -> (view 1 = online/query, view 2 = target/key).
RECIPES: dict[str, tuple[ViewRecipe, ViewRecipe]] = {
    "mocov2": (_MOCOV2, _MOCOV2),
    "mocov2_cifar": (_MOCOV2_CIFAR, _MOCOV2_CIFAR),
    "sce_imagenet": (_SCE_IMAGENET_1, _SCE_IMAGENET_2),
    "sce_cifar": (_MOCOV2_CIFAR, _WEAK),
    "simclr": (_SIMCLR, _SIMCLR),
    "crop_flip": (_WEAK, _WEAK),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(ViewRecipe))


def _override(base: ViewRecipe, overrides: Mapping[str, Any] | None, where: str) -> ViewRecipe:
  """`base` with the non-None entries of `overrides` replaced (tuples for range knobs)."""
  changes = {}
  for name, value in dict(overrides or {}).items():
    if name not in _FIELDS:
      raise ValueError(f"{where}: unknown augmentation knob {name!r}; known: {list(_FIELDS)}")
    if value is not None:
      changes[name] = tuple(value) if isinstance(value, (list, tuple)) else value
  return dataclasses.replace(base, **changes)


def local_crop_scales(data_config) -> list[tuple[float, float]]:
  """The RandomResizedCrop area range of each local crop (`local_crop_sizes` order).

  `local_crop_scale` is one (min, max) pair for every crop or a sequence of pairs, one per crop
  (SCE's multi-crop scales each crop's range with its size).

  Raises:
    ValueError: not a pair or a sequence of pairs of the right length, or a range outside (0, 1].
  """
  sizes = tuple(data_config.get("local_crop_sizes") or ())
  scale = tuple(data_config.get("local_crop_scale") or ())
  per_crop = bool(scale) and all(isinstance(s, (list, tuple)) for s in scale)
  scales = [tuple(s) for s in scale] if per_crop else [scale] * len(sizes)
  if per_crop and len(scales) != len(sizes):
    raise ValueError(f"local_crop_scale has {len(scales)} ranges for {len(sizes)} local crops "
                     f"(local_crop_sizes={sizes}): give one (min, max) pair or one per crop")
  for s in scales:
    if len(s) != 2 or not 0 < s[0] <= s[1] <= 1:
      raise ValueError(f"local_crop_scale: each range must be (min, max) with 0 < min <= max <= "
                       f"1, got {s}")
  return [(float(lo), float(hi)) for lo, hi in scales]


def view_recipes(data_config) -> dict[str, ViewRecipe]:
  """The recipe of every view kind: "view1", "view2", "support" and "local_i" (one per local
  crop: view 1's recipe, then `local_view`, then its `local_crop_scale`).

  Raises:
    ValueError: unknown recipe name, override knob or malformed `local_crop_scale`.
  """
  name = data_config.recipe
  if name not in RECIPES:
    raise ValueError(f"Unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
  base1, base2 = RECIPES[name]
  view1 = _override(base1, data_config.get("view1"), "config.view1")
  view2 = _override(base2, data_config.get("view2"), "config.view2")
  local = _override(view1, data_config.get("local_view"), "config.local_view")
  recipes = {"view1": view1, "view2": view2, "support": view2}
  for i, scale in enumerate(local_crop_scales(data_config)):
    recipes[f"local_{i}"] = dataclasses.replace(local, crop_scale=scale)
  return recipes
