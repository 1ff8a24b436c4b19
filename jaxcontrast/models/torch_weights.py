"""ResNet backbone variables <-> PyTorch (torchvision) state dicts, exactly.

Our ResNets use torchvision's layout (symmetric padding, stride in the bottleneck's 3x3
convolution, v1.5; BatchNorm epsilon 1e-5 with running statistics), so a backbone converts
array by array, with no numerical change:

  flax                                       torchvision
  conv1/kernel            (kh, kw, I, O)     conv1.weight            (O, I, kh, kw)
  bn1/scale, bn1/bias                        bn1.weight, bn1.bias
  batch_stats bn1/mean, bn1/var              bn1.running_mean, bn1.running_var
                                             bn1.num_batches_tracked (int64 scalar)
  layer2_0/conv1/kernel                      layer2.0.conv1.weight
  layer2_0/downsample_conv/kernel            layer2.0.downsample.0.weight
  layer2_0/downsample_bn/...                 layer2.0.downsample.1.*

PyTorch's running variance is the unbiased batch estimate and ours the biased one; inference
uses either the same way, (x - mean) / sqrt(var + eps), so the exported statistics give the
same eval-mode features. `num_batches_tracked` only matters to a BatchNorm with momentum=None.

Torchvision has ResNet-18/34/50 at width 1. Our width multiplier scales every layer, the stem
included; torchvision's wide ResNets (`wide_resnet50_2`) widen only the bottleneck's inner
convolution, so no width other than 1 has a torchvision constructor (the key names and layouts
are still torchvision's). The CIFAR stems and 1-channel inputs need a code change on the torch
side, which `torchvision_model` spells out.

Reading: a `.safetensors` file (no torch needed) or, with torch installed, a `.pth` /
`.pth.tar` read with `torch.load(..., weights_only=True)` (tensors and plain containers only,
never arbitrary pickled objects). Torchvision state dicts and the official MoCo v1/v2
checkpoints (`{"state_dict": {"module.encoder_q.conv1.weight": ...}}`) are both recognised;
the classifier / MoCo head (`fc.*`) is dropped.
"""
from __future__ import annotations

import io
import re
from typing import Any, Mapping

import numpy as np

# Prefixes of the query (online) encoder in common PyTorch self-supervised checkpoints, tried in
# order: MoCo v1/v2 (DataParallel), MoCo without the DataParallel wrapper, plain DataParallel.
PREFIXES = ("module.encoder_q.", "encoder_q.", "module.")
HEAD_PREFIX = "fc."
STEM_KERNELS = {"imagenet": 7, "cifar": 3, "cifar_s2": 3}

_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
         ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
         ("batch_stats", "var"): "running_var"}
_BLOCK_PART = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_TORCH_ORDER = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample.0", "downsample.1")
_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def torch_name(collection: str, path: tuple) -> str:
  """torchvision's state-dict key of the backbone variable `collection`/`path`
  (e.g. "params", ("layer2_0", "downsample_conv", "kernel") -> "layer2.0.downsample.0.weight")."""
  *modules, leaf = path
  parts = []
  for m in modules:
    block = re.fullmatch(r"layer(\d+)_(\d+)", m)
    parts.append(f"layer{block[1]}.{block[2]}" if block else _BLOCK_PART.get(m, m))
  try:
    parts.append(_LEAF[(collection, leaf)])
  except KeyError:
    raise ValueError(f"no torchvision name for backbone variable {collection}/"
                     f"{'/'.join(path)}") from None
  return ".".join(parts)


def _order(name: str) -> tuple:
  """torchvision's module order (stem, then layer by layer, block by block)."""
  parts = name.split(".")
  leaf = _LEAF_ORDER.index(parts[-1]) if parts[-1] in _LEAF_ORDER else len(_LEAF_ORDER)
  if parts[0].startswith("layer"):
    inner = ".".join(parts[2:-1])
    return (1, int(parts[0][5:]), int(parts[1]), _TORCH_ORDER.index(inner), leaf)
  return (0, 0, 0, _TORCH_ORDER.index(parts[0]), leaf)


def _to_torch_layout(collection: str, path: tuple, value: np.ndarray) -> np.ndarray:
  value = np.asarray(value)
  if collection == "params" and path[-1] == "kernel":
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))   # HWIO -> OIHW
  return value


def _from_torch_layout(collection: str, path: tuple, value: np.ndarray) -> np.ndarray:
  if collection == "params" and path[-1] == "kernel":
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))   # OIHW -> HWIO
  return value


def _torch_shape(collection: str, path: tuple, shape: tuple) -> tuple:
  if collection == "params" and path[-1] == "kernel":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _backbone_leaves(variables: Mapping) -> list[tuple[str, tuple, Any]]:
  """(collection, path, leaf) of a backbone's variables {"params"[, "batch_stats"]}."""
  unknown = set(variables) - {"params", "batch_stats"}
  if unknown:
    raise ValueError(f"backbone variables hold collections {sorted(unknown)}; expected "
                     "'params' and 'batch_stats'")
  return [(c, path, leaf) for c in ("params", "batch_stats")
          for path, leaf in _flatten(variables.get(c) or {}).items()]


def to_torchvision(variables: Mapping, *, num_batches_tracked: int = 0
                   ) -> dict[str, np.ndarray]:
  """The backbone's variables `{"params", "batch_stats"}` as a torchvision state dict (float32
  NumPy arrays in OIHW / per-channel layouts, torchvision's key order; no `fc`). Every
  BatchNorm also gets `num_batches_tracked` (int64 scalar), which torchvision's modules hold."""
  out = {}
  for collection, path, leaf in _backbone_leaves(variables):
    out[torch_name(collection, path)] = _to_torch_layout(collection, path,
                                                         np.asarray(leaf, np.float32))
    if collection == "batch_stats" and path[-1] == "mean":
      bn = torch_name(collection, path).rsplit(".", 1)[0]
      out[f"{bn}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
  return {k: out[k] for k in sorted(out, key=_order)}


def backbone_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The backbone's entries of a PyTorch checkpoint's state dict, prefixes stripped, `fc.*`
  dropped. Accepts a torchvision state dict, `{"state_dict": ...}` (MoCo, most training
  scripts) or `{"model": ...}`; with a MoCo prefix present (`module.encoder_q.`), only the query
  encoder's entries are kept (the key encoder and the queue are not the backbone)."""
  for wrapper in ("state_dict", "model"):
    if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
      state_dict = state_dict[wrapper]
      break
  keys = [k for k in state_dict if isinstance(k, str)]
  for prefix in PREFIXES:
    if any(k.startswith(prefix) for k in keys):
      state_dict = {k[len(prefix):]: v for k, v in state_dict.items()
                    if isinstance(k, str) and k.startswith(prefix)}
      break
  return {k: _numpy(v) for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):   # a torch tensor
    return value.detach().cpu().numpy()
  return np.asarray(value)


def from_torchvision(state_dict: Mapping[str, Any], template: Mapping) -> dict:
  """Backbone variables `{"params", "batch_stats"}` (float32 NumPy) from a torchvision state dict
  (`fc.*` and `num_batches_tracked` ignored), shaped like `template` (the backbone's variables
  or their `jax.eval_shape`).

  Raises ValueError naming the first key, in torchvision's module order, that is missing, left
  over, or whose shape differs (with both shapes): an architecture that does not match.
  """
  sd = {k: v for k, v in state_dict.items()
        if not k.startswith(HEAD_PREFIX) and not k.endswith(".num_batches_tracked")}
  expected = {}
  for collection, path, leaf in _backbone_leaves(template):
    expected[torch_name(collection, path)] = (collection, path, tuple(np.shape(leaf)))
  problems = []
  for name in set(expected) | set(sd):
    if name not in sd:
      problems.append((name, f"{name} is missing from the PyTorch weights (the model expects "
                             f"shape {_torch_shape(*expected[name])})"))
    elif name not in expected:
      problems.append((name, f"{name} (shape {tuple(np.shape(sd[name]))}) in the PyTorch "
                             "weights has no place in this model"))
    else:
      want = _torch_shape(*expected[name])
      got = tuple(np.shape(sd[name]))
      if got != want:
        problems.append((name, f"{name} has shape {got} in the PyTorch weights but the model "
                               f"expects {want}"))
  if problems:
    def key(p):
      try:
        return (0, _order(p[0]))
      except (ValueError, IndexError):
        return (1, p[0])
    problems.sort(key=key)
    raise ValueError(f"PyTorch weights do not fit this ResNet ({len(problems)} mismatched "
                     f"keys); first: {problems[0][1]}")
  flat = {}
  for name, (collection, path, _) in expected.items():
    value = np.asarray(sd[name], np.float32)
    flat[(collection,) + path] = _from_torch_layout(collection, path, value)
  out = _unflatten(flat)
  out.setdefault("batch_stats", {})
  return out


def infer_model_config(state_dict: Mapping[str, Any]) -> dict:
  """`{"arch", "stem", "width", "norm", "in_channels"}` of a torchvision-layout backbone state
  dict (prefixes already stripped): blocks per stage, basic or bottleneck blocks, the stem's
  kernel size (7: "imagenet", 3: "cifar"; the stride is not in the weights, so "cifar_s2" reads
  as "cifar"), width = stem channels / 64, BatchNorm if running statistics are present."""
  from jaxcontrast.models.resnet import ARCHS, Bottleneck  # pylint: disable=g-import-not-at-top
  if "conv1.weight" not in state_dict:
    raise ValueError("not a ResNet state dict: no conv1.weight (keys start with "
                     f"{sorted(state_dict)[:3]})")
  out_ch, in_ch, kh, _ = np.shape(state_dict["conv1.weight"])
  stem = {7: "imagenet", 3: "cifar"}.get(kh)
  if stem is None:
    raise ValueError(f"conv1.weight has a {kh}x{kh} kernel; a ResNet stem is 7x7 or 3x3")
  blocks = {}
  for k in state_dict:
    m = re.match(r"layer(\d+)\.(\d+)\.", k)
    if m:
      blocks.setdefault(int(m[1]), set()).add(int(m[2]))
  stages = tuple(len(blocks.get(i, ())) for i in (1, 2, 3, 4))
  bottleneck = "layer1.0.conv3.weight" in state_dict
  for arch, (sizes, block_cls) in ARCHS.items():
    padded = tuple(sizes) + (0,) * (4 - len(sizes))   # ResNet-6: (1, 1, 0, 0)
    if padded == stages and (block_cls is Bottleneck) == bottleneck:
      break
  else:
    raise ValueError(f"no ResNet in {tuple(ARCHS)} has {stages} "
                     f"{'bottleneck' if bottleneck else 'basic'} blocks per stage")
  return {"arch": arch, "stem": stem, "width": out_ch / 64,
          "norm": "batch" if "bn1.running_mean" in state_dict else "group",
          "in_channels": int(in_ch)}


def torchvision_model(arch: str, stem: str, width: float, norm: str = "batch",
                      in_channels: int = 3) -> tuple[str | None, str]:
  """(constructor, code) for the torchvision model an exported backbone loads into:
  `constructor` is "torchvision.models.resnet50" etc. (None when torchvision has no model of
  this width) and `code` the Python that builds it, with the stem changes the CIFAR stems and
  1-channel inputs need."""
  ctor = {"resnet18": "torchvision.models.resnet18", "resnet34": "torchvision.models.resnet34",
          "resnet50": "torchvision.models.resnet50"}.get(arch)
  if width != 1.0:
    return None, (f"# torchvision has no {arch} at width {width:g} (its wide ResNets widen only "
                  "the bottleneck); keys and layouts are torchvision's")
  args = "norm_layer=lambda c: torch.nn.GroupNorm(math.gcd(c, 32), c)" if norm == "group" else ""
  from jaxcontrast.models.resnet import ARCHS  # pylint: disable=g-import-not-at-top
  if len(ARCHS[arch][0]) != 4:   # torchvision's ResNet class always has 4 stages
    return None, f"# torchvision has no {arch}; keys and layouts are torchvision's"
  if ctor is None:   # resnet10: torchvision's ResNet class with one block per stage.
    ctor = "torchvision.models.resnet.ResNet"
    args = "torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]" + (", " + args if args else "")
  lines = [f"model = {ctor}({args})"]
  if stem == "imagenet":
    if in_channels != 3:
      lines.append(f"model.conv1 = torch.nn.Conv2d({in_channels}, 64, 7, 2, 3, bias=False)")
  else:
    s = 2 if stem == "cifar_s2" else 1
    lines.append(f"model.conv1 = torch.nn.Conv2d({in_channels}, 64, 3, {s}, 1, bias=False)")
    lines.append("model.maxpool = torch.nn.Identity()")
  lines.append("model.fc = torch.nn.Identity()   # features, as exported (no classifier)")
  return ctor, "\n".join(lines)


def read_state_dict(path) -> dict[str, np.ndarray]:
  """The backbone entries (`backbone_state_dict`) of the PyTorch weights at `path`: a
  `.safetensors` file, or a `.pth` / `.pth.tar` / `.pt` read with torch (installed separately)
  as `torch.load(..., weights_only=True)`; or our flax export (`.msgpack` + `.json`), converted.
  `path` may be any `etils.epath` path (gs://)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  if not path.exists():
    raise ValueError(f"PyTorch weights {path}: no such file")
  if path.name.endswith(".msgpack"):   # our flax export (jaxcontrast.export, format flax)
    from jaxcontrast import export  # pylint: disable=g-import-not-at-top
    _, variables, meta = export.read_flax(path)
    if meta.get("features") == "projection":
      variables = {c: variables.get(c, {}).get("backbone", {}) for c in ("params", "batch_stats")}
    return to_torchvision(variables)
  data = path.read_bytes()
  if path.name.endswith(".safetensors"):
    from safetensors.numpy import load  # pylint: disable=g-import-not-at-top
    return backbone_state_dict(load(data))
  if not re.search(r"\.(pth|pt|pth\.tar|bin|ckpt)$", path.name):
    raise ValueError(f"PyTorch weights {path}: expected a .safetensors, .pth, .pth.tar, .pt or "
                     "(flax export) .msgpack file")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"reading {path.name} needs torch (pip install torch), or convert it to "
                     ".safetensors first") from None
  loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  if not isinstance(loaded, Mapping):
    raise ValueError(f"{path}: expected a state dict, got {type(loaded).__name__}")
  return backbone_state_dict(loaded)


def init_state_from(state, path):
  """`state` (a `TrainState`) with both networks' backbones (params and BatchNorm statistics)
  replaced by the PyTorch ResNet weights at `path`, each array kept in its sharding; the
  projector, predictor, optimizer state and queue are left as initialised. ValueError (first
  key, both shapes) if the weights do not fit the configured backbone."""
  import jax  # pylint: disable=g-import-not-at-top
  template = {"params": state.params["backbone"],
              "batch_stats": state.batch_stats.get("backbone", {})}
  loaded = from_torchvision(read_state_dict(path), template)

  def put(tree, like):
    return jax.tree.map(lambda v, old: jax.device_put(v, old.sharding), tree, like)

  def with_backbone(tree, new):
    return {**tree, "backbone": put(new, tree["backbone"])} if new else tree

  return state.replace(
      params=with_backbone(state.params, loaded["params"]),
      ema_params=with_backbone(state.ema_params, loaded["params"]),
      batch_stats=with_backbone(state.batch_stats, loaded["batch_stats"]),
      ema_batch_stats=with_backbone(state.ema_batch_stats, loaded["batch_stats"]))
