"""The linear probe's own config: `default_probe_config()`, overridable as --config.KEY=VALUE.

The pretrained run's config (model, data set, normalisation) comes from its checkpoint; this
config only says how to probe it. It is locked by the command line (absl `config_flags`), so a
mistyped key fails instead of silently probing with the default; `validate` raises the
`ConfigError` of the first bad value.
"""
import ml_collections
from ml_collections import config_dict

from jaxcontrast.config_check import fail, is_int

ENCODERS = ("target", "online", "random", "pixels")
TORCHVISION = "torchvision:"
PROTOCOLS = ("auto", "full_batch", "sgd")
FEATURES = ("backbone", "projection")
SCHEDULES = ("step", "cosine")


def default_probe_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What is probed: "target" (EMA / key encoder, the MoCo convention), "online" (query
  # encoder), "random" (same architecture, randomly initialised from the run's config: the
  # baseline to beat) or "pixels" (normalised raw pixels, the other baseline).
  # "torchvision:PATH" probes PyTorch ResNet weights (a torchvision or MoCo v1/v2 state dict,
  # .safetensors or, with torch installed, .pth / .pth.tar) on the data set of `data` below;
  # results go to --workdir.
  c.encoder = "target"
  # "backbone" (pooled backbone features, the standard probe input) or "projection".
  c.features = "backbone"
  # Checkpoint step to load; None = the latest.
  c.step = config_dict.placeholder(int)
  # "full_batch" (precomputed features, L-BFGS, L2 chosen on held-out train rows), "sgd" (MoCo
  # v2 protocol: augmented images through the frozen encoder, SGD), or "auto": full_batch when
  # the train split has at most `full_batch_max_train` examples, else sgd.
  c.protocol = "auto"
  c.full_batch_max_train = 200_000
  # Labelled splits (tfds syntax, e.g. "train[:10%]"); test_split None = the dataset's eval split
  # (Fashion-MNIST / CIFAR "test", ImageNet "validation").
  c.train_split = "train"
  c.test_split = config_dict.placeholder(str)
  # tfds data_dir; None = the run's data.data_dir (set it when evaluating on another machine).
  c.data_dir = config_dict.placeholder(str)
  # Global batch of feature extraction and evaluation.
  c.batch_size = 256
  # Held-out split, random encoder initialisation, SGD data order and classifier init.
  c.seed = 0
  # Result file in the workdir; None = linear_probe.json for the target encoder's backbone,
  # else linear_probe_<encoder>[_<features>].json (baselines do not overwrite the main result);
  # a protocol forced against the automatic choice adds _<protocol> (linear_probe_sgd.json).
  c.output = config_dict.placeholder(str)
  # Data settings for encoder="torchvision:PATH" only (a run's encoder probes on the run's data):
  # data set (required), and optionally image size, normalisation, tfds data_dir; see
  # data/config.py for their meaning. Channels default to what the weights take.
  c.data = ml_collections.ConfigDict()
  c.data.dataset = config_dict.placeholder(str)
  c.data.image_size = config_dict.placeholder(int)
  c.data.mean = config_dict.placeholder(tuple)
  c.data.std = config_dict.placeholder(tuple)
  c.data.eval_crop_ratio = config_dict.placeholder(float)

  # Full-batch protocol: min_W,b mean CE + l2/2 ||W||^2 on standardised features.
  c.full_batch = ml_collections.ConfigDict()
  c.full_batch.l2_grid = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # candidates, chosen on held-out rows
  c.full_batch.held_out_fraction = 0.1   # train rows held out for the choice (never test)
  c.full_batch.max_iter = 100            # L-BFGS iterations per fit (200: +0.06% top-1 on FMNIST)
  c.full_batch.tol = 1e-4                # stop when ||gradient||_2 < tol

  # SGD protocol (MoCo v2 linear classification; SCE: lr 0.4, batch 1024, 90 epochs cosine).
  c.sgd = ml_collections.ConfigDict()
  c.sgd.batch_size = 256
  c.sgd.epochs = 100
  c.sgd.total_steps = config_dict.placeholder(int)  # None = epochs x train examples / batch
  c.sgd.lr = 30.0
  c.sgd.momentum = 0.9
  c.sgd.weight_decay = 0.0
  c.sgd.schedule = "step"                # "step" (x drop_factor at drop_epochs) | "cosine"
  c.sgd.drop_epochs = (60, 80)
  c.sgd.drop_factor = 0.1
  c.sgd.crop_scale = (0.08, 1.0)         # RandomResizedCrop area range (torchvision default)
  c.sgd.checkpoint_every = 1000          # steps; checkpoints in WORKDIR/linear_probe_sgd[_...]/
  c.sgd.log_every = 100
  return c


def encoder_list(c) -> list[str]:
  """`c.encoder` split on commas: "target,random,pixels" probes the three in one process."""
  return [e.strip() for e in str(c.encoder).split(",")]


def validate(c) -> None:
  """ConfigError ("config key = value: expected ...") naming the first invalid key."""
  names = encoder_list(c)
  for name in names:
    torchvision = name.startswith(TORCHVISION) and len(name) > len(TORCHVISION)
    if name not in ENCODERS and not torchvision:
      fail("", "encoder", c.encoder,
           f"one of {ENCODERS} or '{TORCHVISION}PATH' (or several, comma-separated)")
  if len(set(names)) != len(names):
    fail("", "encoder", c.encoder, "each encoder named once (it names one twice)")
  if len(names) > 1:
    if c.output:
      fail("", "output", c.output, "None with several encoders (output names one file)")
    for name in names:  # Each one as it will run.
      validate(_with_encoder(c, name))
    return
  data_set = {k: v for k, v in c.data.items() if v is not None}
  if c.encoder.startswith(TORCHVISION):
    if not c.data.dataset:
      fail("data", "dataset", c.data.dataset, "the data set to probe on with "
           "encoder='torchvision:PATH', e.g. --config.data.dataset=imagenet2012")
    if c.features != "backbone":
      fail("", "features", c.features, "'backbone' with encoder='torchvision:PATH' (PyTorch "
           "weights hold a backbone only)")
  elif data_set:
    key = sorted(data_set)[0]
    fail("data", key, data_set[key], "None: data.* applies to encoder='torchvision:PATH' only "
         "(a run's encoder probes on its own data)")
  if c.features not in FEATURES:
    fail("", "features", c.features, f"one of {FEATURES}")
  if c.encoder == "pixels" and c.features != "backbone":
    fail("", "features", c.features, "'backbone' with encoder='pixels' (no projection head)")
  if c.protocol not in PROTOCOLS:
    fail("", "protocol", c.protocol, f"one of {PROTOCOLS}")
  if c.sgd.schedule not in SCHEDULES:
    fail("sgd", "schedule", c.sgd.schedule, f"one of {SCHEDULES}")
  for section, key in (("", "batch_size"), ("sgd", "batch_size")):
    value = c.sgd[key] if section else c[key]
    if not is_int(value) or value < 1:
      fail(section, key, value, "an int >= 1")


def _with_encoder(c, name: str):
  one = c.copy_and_resolve_references()
  one.encoder = name
  return one


def split_encoders(c) -> list:
  """One probe config per encoder of `c.encoder` (validated)."""
  validate(c)
  return [_with_encoder(c, name) for name in encoder_list(c)]


def output_stem(c) -> str:
  """"linear_probe" for the target backbone; linear_probe_<encoder>[_<features>] otherwise."""
  stem = "linear_probe"
  if c.encoder.startswith(TORCHVISION):   # linear_probe_torchvision_<file name>
    name = c.encoder[len(TORCHVISION):].rstrip("/").rsplit("/", 1)[-1].split(".")[0]
    stem += "_torchvision_" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
  elif c.encoder != "target":
    stem += f"_{c.encoder}"
  if c.features != "backbone":
    stem += f"_{c.features}"
  return stem
