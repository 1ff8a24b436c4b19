"""MoCo v2's train step in PyTorch, written for the benchmark: the yardstick for our JAX step.

Same work as `train.make_train_step` for the MoCo v2 configs: torchvision's ResNet layout (the
CIFAR stem = 3x3 stride-1 conv1 and no max-pool), projector Linear-ReLU-...-Linear without BN, EMA of
the key encoder's parameters before the key forward, Shuffle BN on one device (keys computed on a
random permutation of the key batch, then put back), L2-normalised embeddings, InfoNCE over
[positive, queue] / tau, SGD with momentum and coupled weight decay, enqueue of the keys. bf16
through `torch.autocast` with channels_last memory (what a PyTorch user would run for speed);
eager, or with the forward-and-loss function under `torch.compile` (the optimizer and EMA use
PyTorch's fused multi-tensor `foreach` kernels in both).

torch is an optional extra (`pip install -e ".[bench]"`), never a dependency of the library:
`available()` says whether it imports. torchvision is not needed; where it imports, the
reference's parameter count is checked against torchvision's model of the same name.
"""
from __future__ import annotations

import copy
import statistics
import time


def available() -> tuple[bool, str]:
  """(True, version) when torch imports, else (False, why)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return False, f"{type(e).__name__}: {e}"
  return True, torch.__version__


_LAYERS = {"resnet6": ("basic", (1, 1)), "resnet10": ("basic", (1, 1, 1, 1)),
           "resnet18": ("basic", (2, 2, 2, 2)),
           "resnet34": ("basic", (3, 4, 6, 3)), "resnet50": ("bottleneck", (3, 4, 6, 3))}


def build_encoder(*, arch: str, stem: str, hidden: tuple, proj_dim: int):
  """torchvision's ResNet layout (v1.5: the stride on the 3x3 convolution; written out here so
  that torchvision's compiled extensions are not needed) with the MoCo v2 projector after the
  global average pool."""
  import torch.nn as nn  # pylint: disable=g-import-not-at-top
  if arch not in _LAYERS:
    raise ValueError(f"the PyTorch reference knows {tuple(_LAYERS)}, not {arch!r}")
  kind, layers = _LAYERS[arch]
  expansion = 4 if kind == "bottleneck" else 1

  def conv_bn(c_in, c_out, k, stride=1, relu=True):
    parts = [nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out)]
    return parts + [nn.ReLU(inplace=True)] if relu else parts

  class Block(nn.Module):
    def __init__(self, c_in, width, stride):
      super().__init__()
      c_out = width * expansion
      if kind == "bottleneck":
        body = (conv_bn(c_in, width, 1) + conv_bn(width, width, 3, stride) +
                conv_bn(width, c_out, 1, relu=False))
      else:
        body = conv_bn(c_in, width, 3, stride) + conv_bn(width, width, 3, relu=False)
      self.body = nn.Sequential(*body)
      self.down = (nn.Sequential(*conv_bn(c_in, c_out, 1, stride, relu=False))
                   if stride != 1 or c_in != c_out else nn.Identity())
      self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
      return self.relu(self.body(x) + self.down(x))

  if stem == "imagenet":
    modules = conv_bn(3, 64, 7, 2) + [nn.MaxPool2d(3, 2, 1)]
  elif stem in ("cifar", "cifar_s2"):
    modules = conv_bn(3, 64, 3, 2 if stem == "cifar_s2" else 1)
  else:
    raise ValueError(f"unknown stem {stem!r}")
  c_in = 64
  for stage, blocks in enumerate(layers):
    width = 64 * 2 ** stage
    for b in range(blocks):
      modules.append(Block(c_in, width, 2 if stage > 0 and b == 0 else 1))
      c_in = width * expansion
  modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  dims = [c_in, *hidden]
  for d_in, d_out in zip(dims[:-1], dims[1:]):
    modules += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True)]
  modules.append(nn.Linear(dims[-1], proj_dim))
  return nn.Sequential(*modules)


class MoCoStep:
  """One MoCo v2 train step per `__call__(im_q, im_k)`; `compile=True` wraps the forward and
  loss in `torch.compile`."""

  def __init__(self, *, arch, stem, hidden, proj_dim, queue_size, temperature, momentum, lr,
               sgd_momentum, weight_decay, batch, bf16, channels_last, device, compile):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.device = torch.device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    self.memory_format = fmt
    torch.manual_seed(0)
    self.q = build_encoder(arch=arch, stem=stem, hidden=tuple(hidden), proj_dim=proj_dim)
    self.q = self.q.to(self.device, memory_format=fmt).train()
    self.k = copy.deepcopy(self.q)
    for p in self.k.parameters():
      p.requires_grad_(False)
    self.q_params = list(self.q.parameters())
    self.k_params = list(self.k.parameters())
    self.queue = torch.nn.functional.normalize(
        torch.randn(queue_size, proj_dim, device=self.device), dim=1)
    self.ptr = 0
    self.temperature, self.m, self.batch = temperature, momentum, batch
    self.opt = torch.optim.SGD(self.q_params, lr=lr, momentum=sgd_momentum,
                               weight_decay=weight_decay, foreach=True)
    self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16)
    self.labels = torch.zeros(batch, dtype=torch.long, device=self.device)
    self.forward_loss = torch.compile(self._forward_loss) if compile else self._forward_loss

  def _forward_loss(self, im_q, im_k, perm, inverse, queue):
    F = self.torch.nn.functional  # pylint: disable=invalid-name
    with self.torch.no_grad():
      k = F.normalize(self.k(im_k[perm])[inverse].float(), dim=1)   # Shuffle BN, one device
    q = F.normalize(self.q(im_q).float(), dim=1)
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.T
    logits = self.torch.cat([l_pos, l_neg], dim=1) / self.temperature
    return F.cross_entropy(logits, self.labels), k

  def __call__(self, im_q, im_k):
    torch = self.torch
    with torch.no_grad():   # EMA before the keys (MoCo v2)
      torch._foreach_mul_(self.k_params, self.m)
      torch._foreach_add_(self.k_params, self.q_params, alpha=1 - self.m)
    perm = torch.randperm(self.batch, device=self.device)
    inverse = torch.argsort(perm)
    with torch.autocast(**self.autocast):
      loss, k = self.forward_loss(im_q, im_k, perm, inverse, self.queue)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      self.queue[self.ptr:self.ptr + self.batch] = k
      self.ptr = (self.ptr + self.batch) % self.queue.shape[0]
    return loss

  def images(self, size: int, seed: int):
    g = self.torch.Generator(device="cpu").manual_seed(seed)
    x = self.torch.randn(self.batch, 3, size, size, generator=g)
    return x.to(self.device).contiguous(memory_format=self.memory_format)

  def sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()


def reference_settings(config) -> dict:
  """MoCoStep's settings from a jaxcontrast MoCo v2 config (same model, batch, queue, loss,
  optimizer at the schedule's peak lr, EMA); a ValueError for configs it does not mirror."""
  problems = []
  if config.objective.loss != "moco" or config.objective.symmetric:
    problems.append(f"loss {config.objective.loss!r} (symmetric={config.objective.symmetric})")
  if config.model.proj_bn or config.model.pred_dim:
    problems.append("projector BN / predictor")
  if float(config.model.width) != 1.0:
    problems.append(f"width {config.model.width}")
  if config.optim.name != "sgd":
    problems.append(f"optimizer {config.optim.name!r}")
  if config.data.local_crop_sizes or config.objective.fnc.num_support_views:
    problems.append("multi-crop / support views")
  if problems:
    raise ValueError("--reference torch mirrors the MoCo v2 step (moco loss, no projector BN, "
                     "width 1, SGD, two views); this config has: " + "; ".join(problems))
  lr = float(config.optim.base_lr)
  if config.optim.lr_scaling == "linear":
    lr *= config.global_batch_size / 256
  return dict(arch=config.model.arch, stem=config.model.stem,
              hidden=tuple(config.model.proj_hidden_dims), proj_dim=int(config.model.proj_dim),
              queue_size=int(config.queue.size), temperature=float(config.objective.temperature),
              momentum=float(config.ema.momentum), lr=lr,
              sgd_momentum=float(config.optim.momentum),
              weight_decay=float(config.optim.weight_decay), batch=int(config.global_batch_size),
              bf16=config.model.dtype == "bfloat16")


def bench_reference(config, *, image_size: int, steps: int, warmup: int, device: str | None,
                    modes=("eager", "compile"), channels_last: bool = True) -> dict:
  """{mode: {images_per_s, step_ms_median, first_step_s, peak_memory_bytes}} of the PyTorch
  MoCo v2 step mirroring `config`; {"skipped": why} without torch."""
  ok, version = available()
  if not ok:
    return {"skipped": f"torch not importable ({version}); pip install -e '.[bench]'"}
  import torch  # pylint: disable=g-import-not-at-top
  settings = reference_settings(config)
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  out = {"torch_version": version, "device": device, "channels_last": channels_last}
  out["params"] = sum(p.numel() for p in build_encoder(
      arch=settings["arch"], stem="imagenet", hidden=(), proj_dim=1000).parameters())
  try:   # the same layout as torchvision's: same parameter count (ImageNet stem, 1000-way fc)
    import torchvision  # pylint: disable=g-import-not-at-top
    out["torchvision_params"] = sum(
        p.numel() for p in getattr(torchvision.models, settings["arch"])().parameters())
  except Exception:  # pylint: disable=broad-except  (absent, or its extensions do not load)
    pass
  if device == "cuda":
    out["device_name"] = torch.cuda.get_device_name(0)
    torch.backends.cudnn.benchmark = True
  for mode in modes:
    step = MoCoStep(**settings, channels_last=channels_last, device=device,
                    compile=mode == "compile")
    im_q, im_k = step.images(image_size, 0), step.images(image_size, 1)
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step(im_q, im_k)
    step.sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
      step(im_q, im_k)
    step.sync()
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      loss = step(im_q, im_k)
      step.sync()
      times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    out[mode] = {"step_ms_median": round(1e3 * median, 3),
                 "images_per_s": round(settings["batch"] / median, 1),
                 "first_step_s": round(first, 2), "final_loss": float(loss.detach()),
                 "peak_memory_bytes": (int(torch.cuda.max_memory_allocated())
                                       if device == "cuda" else None)}
    del step
  return out
