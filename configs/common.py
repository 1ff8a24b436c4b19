"""Parts shared by the config files: dataset scale, MoCo's two base recipes, variants.

Config files load this module with `config_lib.load_sibling(__file__, "common")` (config_flags
loads configs by path, outside any package, so a plain `import common` would depend on the
current directory). Formulas and sources: docs/METHODS.md (§0-§1 for what is here).

  base(method, dataset)   base_config() + dataset-scale backbone and run cadence
  moco_cifar_demo(c)      MoCo's CIFAR-10 demo recipe (the small-dataset MoCo v2 recipe)
  mocov2_imagenet(c)      MoCo v2's ImageNet recipe
  epochs(c, n)            n epochs in steps, following later changes of global_batch_size
  finish(c, arg, **own)   applies the variants named in `arg` (e.g. "tiny,queue_ids")

Variants. `VARIANTS` maps a name to a function that edits a config in place; every config file
accepts them, plus its own (e.g. SePP's "queue_ids", passed to `finish` as keyword arguments).
They combine with commas (`configs/sepp_fashion_mnist.py:tiny,queue_ids`) and are applied in a
fixed order: the file's own first, then VARIANTS in the order listed here, so shrinking
variants ("tiny") come last and see the final recipe. To add one (say a CPU-budget "cpu"):
write `def cpu(c): ...` below, add `"cpu": cpu` to VARIANTS before "tiny", and document it in
docs/training.md (Variants). A recipe that deserves its own command line gets its own file
(`configs/moco_fashion_mnist_cpu.py` calling `common.cpu(c)`).
"""
from jaxcontrast import config_lib

# Train-split sizes (tfds), for settings given in epochs.
TRAIN_EXAMPLES = {"fashion_mnist": 60_000, "fashion_mnist_debian": 60_000, "cifar10": 50_000,
                  "cifar100": 50_000, "imagenet2012": 1_281_167}
SMALL_DATASETS = ("fashion_mnist", "fashion_mnist_debian", "cifar10", "cifar100")


def epochs(c, n: float):
  """`n` epochs of `c.data.dataset`'s train split in steps at `c.global_batch_size`.

  A FieldReference: a later `--config.global_batch_size=...` changes it too (setting the key
  that holds it, e.g. `--config.knn_every=500`, replaces it). Assumes the whole train split.
  """
  return int(n * TRAIN_EXAMPLES[c.data.dataset]) // c.get_ref("global_batch_size")


def base(method: str, dataset: str):
  """Defaults for `method` on `dataset`: backbone sized for the images, run cadence."""
  if method not in config_lib.METHODS:
    raise ValueError(f"unknown method {method!r}; known: {config_lib.METHODS}")
  if dataset not in TRAIN_EXAMPLES:
    raise ValueError(f"no config scale for dataset {dataset!r}; known: {sorted(TRAIN_EXAMPLES)}")
  c = config_lib.base_config()
  c.method = method
  c.data.dataset = dataset
  if dataset in SMALL_DATASETS:
    # 28-32 px images: ResNet-18 with a 3x3 stride-1 stem and no max-pool (MoCo's CIFAR demo).
    c.model.update(arch="resnet18", stem="cifar")
    c.checkpoint_every = epochs(c, 5)
    c.knn_every = epochs(c, 2)      # kNN monitor on the test split (MoCo's demo: every epoch)
  else:
    c.model.update(arch="resnet50", stem="imagenet")
    c.checkpoint_every = epochs(c, 1)
    # kNN over 1.28M train images is an evaluation of its own; enable with e.g.
    # --config.knn_every=5000 --config.knn.num_train=100000.
    c.knn_every = 0
  return c


def moco_cifar_demo(c) -> None:
  """MoCo's CIFAR-10 demo (facebookresearch/moco colab; docs/METHODS.md §1): R18 CIFAR stem,
  K 4096, m 0.99, tau 0.1, batch 512, SGD lr 0.06 (not scaled) wd 5e-4, cosine, 200 epochs,
  8-group split BN, MoCo v2 augmentations without blur ("mocov2_cifar"). Projector
  512-512-128: our choice (MoCo v2's MLP head at R18's 512 features, as in SCE's CIFAR
  recipe), not taken from the demo."""
  c.model.update(arch="resnet18", stem="cifar", proj_hidden_dims=(512,), proj_dim=128)
  c.queue.size = 4096
  c.ema.update(momentum=0.99, schedule="constant", update_at="before_keys")
  c.objective.temperature = 0.1
  c.global_batch_size = 512
  c.num_epochs = 200
  c.optim.update(name="sgd", base_lr=0.06, lr_scaling="none", momentum=0.9, weight_decay=5e-4,
                 schedule="cosine", warmup_steps=0)
  c.bn.update(mode="ghost", groups=8)   # one device's emulation of Shuffle BN (METHODS §0)
  c.data.recipe = "mocov2_cifar"


def mocov2_imagenet(c) -> None:
  """MoCo v2 on ImageNet (arXiv 2003.04297, facebookresearch/moco; docs/METHODS.md §1): R50,
  K 65,536, m 0.999, tau 0.2, batch 256, SGD lr 0.03 x B/256 momentum 0.9 wd 1e-4, cosine,
  200 epochs, projector 2048-2048-128 without BN, Shuffle BN across devices."""
  c.model.update(arch="resnet50", stem="imagenet", proj_hidden_dims=(2048,), proj_dim=128,
                 proj_bn=False, proj_last_bn=False)
  c.queue.size = 65536
  c.ema.update(momentum=0.999, schedule="constant", update_at="before_keys")
  c.objective.temperature = 0.2
  c.global_batch_size = 256
  c.num_epochs = 200
  c.optim.update(name="sgd", base_lr=0.03, lr_scaling="linear", momentum=0.9,
                 weight_decay=1e-4, schedule="cosine", warmup_steps=0)
  c.bn.mode = "shuffle"
  c.data.recipe = "mocov2"


def tiny(c) -> None:
  """Shrinks any recipe for tests and smoke runs: ResNet-6 (two stages of one basic block) at
  width 1/8, 16x16 inputs (local crops 12, 10, 8, ...), batch 16, K 64, 4 steps, no kNN; the
  method's own settings stay (a file's own variants run before it, in any order:
  `:tiny,multicrop`). `--config.model.arch=resnet10` gives the 4-stage network (torchvision's
  layout, exportable to `torchvision.models.resnet.ResNet`)."""
  c.model.update(arch="resnet6", stem="cifar", width=0.125, proj_hidden_dims=(32,), proj_dim=16)
  if c.model.pred_dim:
    c.model.update(pred_hidden_dims=(32,), pred_dim=16)
  c.data.image_size = 16
  c.global_batch_size = 16
  c.queue.size = 64
  c.total_steps = 4
  c.log_every = 1
  c.checkpoint_every = 2
  c.knn_every = 0
  if c.optim.warmup_steps or c.optim.warmup_epochs:
    c.optim.warmup_epochs, c.optim.warmup_steps = None, 1
  if c.bn.mode == "ghost":
    c.bn.groups = 4
  if c.objective.fnc.num_support_views:
    c.objective.fnc.num_support_views = c.data.num_support_views = 2
  if c.data.local_crop_sizes:   # multi-crop: same number of local crops, 12, 10, 8, ... px
    c.data.local_crop_sizes = tuple(max(4, 12 - 2 * i) for i in range(len(c.data.local_crop_sizes)))
  c.data.shuffle_buffer = 64


def cpu(c) -> None:
  """The main job's budget on 28x28 images: a few minutes of pretraining on 2 CPU cores
  (`bash launch/local.sh`). Backbone, batch, optimizer, crops and run length are those of
  configs/moco_fashion_mnist_cpu.py, whose docstring gives the reasons (the measurements behind
  them: docs/results.md); the method's own settings (loss, temperatures, EMA, queue, BN mode,
  photometric recipe) stay, so every `configs/<method>_fashion_mnist.py:cpu` trains at the same
  budget (benchmarks/fashion_mnist_results.sh)."""
  # ResNet-18 at width 1/4 (128-d features) with a stride-2 stem: 14x14 maps in stage 1.
  c.model.update(arch="resnet18", stem="cifar_s2", width=0.25, proj_bn=True)
  # Batch 128: twice the updates of 256 per epoch at the same images/s (kNN after one epoch
  # 70.2% against 68.0%; batch 64 runs ~20% slower per image for no gain).
  c.global_batch_size = 128
  c.num_epochs = 2.5
  c.total_steps = None
  # AdamW lr 2e-3 (1e-3: kNN 70.2% against 70.7% after one epoch); SGD 0.06 (the demo's) made
  # the features worse than at initialisation in 2 epochs.
  c.optim.update(name="adamw", base_lr=2e-3, lr_scaling="none", weight_decay=1e-4,
                 schedule="cosine")
  c.optim.warmup_steps = 0
  c.optim.warmup_epochs = 0.1      # (SCE's 5 warm-up epochs would be most of the run)
  for view in (c.data.view1, c.data.view2):
    view.crop_scale = (0.3, 1.0)   # 0.2 cuts away most of a 28x28 garment
  c.data.cache = True              # 47 MB decoded: the input then costs a fraction of a core;
                                   # the kNN and probe splits are kept in memory too
  c.log_every = 50
  c.checkpoint_every = epochs(c, 1)
  c.knn_every = epochs(c, 1)       # the kNN curve (knn/top1 in metrics.jsonl); ~15-30 s each
  c.knn.num_train = 10_000         # memory bank: 10,000 train images (seconds per call)


# Variants every config file accepts, in the order they are applied (see the module docstring).
VARIANTS = {"cpu": cpu, "tiny": tiny}


def finish(c, arg=None, **own):
  """Applies the variants in `arg` (the text after ':' in --config): the file's own (keyword
  arguments name -> function) first, then VARIANTS. Returns `c`."""
  return config_lib.apply_variants(c, arg, {**own, **VARIANTS})
