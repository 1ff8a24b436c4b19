"""The data section of a jaxcontrast config: `default_data_config()`.

Keys left as placeholders (None) take a per-dataset or per-recipe default, resolved in
`datasets.py` / `recipes.py`; they are typed placeholders so that command-line flags
(`--config.data.image_size=64`) can still set them.
"""
import ml_collections
import numpy as np
from ml_collections import config_dict


# Where the photometric ops run (`data.augment_on`).
AUGMENT_ON = ("auto", "host", "device")


def augment_on(data_config) -> str:
  """Where the photometric ops run, "host" or "device": `data.augment_on`, with "auto" resolved
  to "device" on GPU / TPU and "host" on CPU (the JAX default backend). No TensorFlow: the
  pipeline and the benchmark harness (on machines without it) share this one resolution."""
  value = data_config.get("augment_on") or "auto"
  if value not in AUGMENT_ON:
    raise ValueError(f"data.augment_on = {value!r}: expected one of {AUGMENT_ON}")
  if value == "auto":
    import jax  # pylint: disable=g-import-not-at-top
    return "host" if jax.default_backend() == "cpu" else "device"
  return value


# ITU-R 601-2 luma weights, those of the pipeline's RGB -> gray conversion (augment._LUMA).
LUMA = (0.299, 0.587, 0.114)


def normalization(data_config, channels: int, *, spec=None
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel, in [0, 1] pixel units, that the pipeline applies for
  `data_config` with `channels` input channels: `data.mean` / `data.std`, else the dataset's
  statistics (`spec`, a `specs.DatasetSpec`; None looks up `data.dataset`), adapted to the
  channel count:

    k statistics for k channels: as they are;
    1 for C channels: repeated C times (grayscale fed as RGB);
    3 for 1 channel: luma-weighted, mean_gray = sum_c w_c mean_c (likewise std) with
      w = LUMA, the weights of the RGB -> gray conversion the images went through.

  The pipeline (`pipeline.py`) and encoders loaded from checkpoints (`eval/encoders.py`) both
  call this, so an encoder sees its inputs normalised as in training.
  """
  mean, std = data_config.get("mean"), data_config.get("std")
  if not mean or not std:
    if spec is None:
      from jaxcontrast.data import specs  # pylint: disable=g-import-not-at-top
      spec = specs.get_spec(data_config.get("dataset"))
    mean, std = mean or spec.mean, std or spec.std
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if len(mean) != len(std):
    raise ValueError(f"mean {mean} and std {std} differ in length")
  if len(mean) == channels:
    return mean, std
  if len(mean) == 1:
    return mean * channels, std * channels
  if len(mean) == 3 and channels == 1:
    luma = np.asarray(LUMA)
    return (float(luma @ mean),), (float(luma @ std),)
  raise ValueError(f"{data_config.get('dataset')}: {len(mean)} normalisation statistics for "
                   f"{channels} channels")


def view_overrides() -> ml_collections.ConfigDict:
  """Per-view overrides of the recipe's knobs; None keeps the recipe's value."""
  c = ml_collections.ConfigDict()
  c.crop_scale = config_dict.placeholder(tuple)  # RandomResizedCrop area range, e.g. (0.2, 1.0).
  c.crop_ratio = config_dict.placeholder(tuple)  # RandomResizedCrop aspect range (3/4, 4/3).
  c.flip_prob = config_dict.placeholder(float)  # Horizontal flip probability.
  c.jitter_prob = config_dict.placeholder(float)  # Probability of colour jitter.
  c.brightness = config_dict.placeholder(float)  # Jitter brightness strength.
  c.contrast = config_dict.placeholder(float)  # Jitter contrast strength.
  c.saturation = config_dict.placeholder(float)  # Jitter saturation strength.
  c.hue = config_dict.placeholder(float)  # Jitter hue strength (<= 0.5).
  c.grayscale_prob = config_dict.placeholder(float)  # Probability of grayscale.
  c.blur_prob = config_dict.placeholder(float)  # Probability of Gaussian blur.
  c.blur_sigma = config_dict.placeholder(tuple)  # Blur sigma range in pixels, e.g. (0.1, 2.0).
  c.solarize_prob = config_dict.placeholder(float)  # Probability of solarize.
  c.solarize_threshold = config_dict.placeholder(float)  # Solarize threshold in [0, 1].
  return c


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults: Fashion-MNIST (offline), MoCo v2 recipe, two views."""
  c = ml_collections.ConfigDict()
  # Dataset name: fashion_mnist (tfds' if prepared in data_dir, else the Debian files offline),
  # fashion_mnist_debian (the Debian files only), cifar10, cifar100, stl10, imagenet2012, or
  # "tfds:<builder>" for any other prepared tfds dataset (see specs.KNOWN_DATASETS).
  c.dataset = "fashion_mnist"
  # tfds data_dir (local folder or gs://bucket/path); None = tfds default ($TFDS_DATA_DIR or
  # ~/tensorflow_datasets). Datasets other than Fashion-MNIST must already be prepared there.
  c.data_dir = config_dict.placeholder(str)
  # Pretraining split (tfds split syntax, e.g. "train[:10%]"); None = dataset default
  # ("train"; stl10: "unlabelled").
  c.train_split = config_dict.placeholder(str)
  # Evaluation split; None = dataset default ("test"; imagenet2012: "validation").
  c.eval_split = config_dict.placeholder(str)
  # Crop size of the global views and of evaluation images; None = dataset native size
  # (28 fashion_mnist, 32 cifar, 96 stl10, 224 imagenet2012).
  c.image_size = config_dict.placeholder(int)
  # Channels fed to the model: None keeps the dataset's; 3 replicates grayscale; 1 takes luma.
  c.num_channels = config_dict.placeholder(int)
  # Augmentation recipe: mocov2 | mocov2_cifar | sce_imagenet | sce_cifar | simclr | crop_flip.
  c.recipe = "mocov2"
  # Overrides of the recipe for view 1 (online/query branch); None entries keep the recipe.
  c.view1 = view_overrides()
  # Overrides of the recipe for view 2 (target/key branch; also used by support views).
  c.view2 = view_overrides()
  # FNC: number S of extra target-branch views per image ("support", (B, S, H, W, C)).
  c.num_support_views = 0
  # Multi-crop: sizes of the extra local crops ("local_0", ...), e.g. (96, 96); () = none.
  c.local_crop_sizes = ()
  # Multi-crop: RandomResizedCrop area range of the local crops: one (min, max) pair for all,
  # or one pair per crop, e.g. ((0.172, 0.86), (0.086, 0.429)).
  c.local_crop_scale = (0.05, 0.14)
  # Multi-crop: overrides of view 1's recipe for the local crops (online branch).
  c.local_view = view_overrides()
  # SePP: path of a semantic pairs .npz (jaxcontrast.semantic_pairs); None = off.
  c.semantic_pairs = config_dict.placeholder(str)
  # SePP: probability that view 2 comes from a semantic partner instead of the anchor.
  c.p_semantic = 0.5
  # Largest split (bytes) held in memory: SePP's decoded train split (random access by id) and,
  # with `cache`, each prepared evaluation split (eval/features.py).
  c.in_memory_max_bytes = 4 * 2**30
  # Input streams the global batch is assembled from: the split is cut into this many parts,
  # each read and shuffled on its own, and every global batch takes global_batch / streams rows
  # from each. None = one per process. The batches depend on (seed, streams) only: give runs on
  # different process counts (or a resume on another host count) the same value, a multiple of
  # every process count used, to train on the same batches.
  c.streams = config_dict.placeholder(int)
  # Shuffle buffer (examples, per stream); shuffling happens before decoding.
  c.shuffle_buffer = 10_000
  # Batches prefetched by tf.data on the host (-1 = AUTOTUNE).
  c.prefetch = 2
  # Cache the decoded split in memory after the first epoch (small datasets only); evaluation
  # splits (kNN monitor, linear probe) are then also kept after their first pass.
  c.cache = False
  # Evaluation: resize the shorter side to image_size / ratio, then centre crop; None = dataset
  # default (1.0 for the small datasets, 0.875 for imagenet2012).
  c.eval_crop_ratio = config_dict.placeholder(float)
  # Normalisation mean / std per channel (in [0, 1] units); None = dataset statistics.
  c.mean = config_dict.placeholder(tuple)
  c.std = config_dict.placeholder(tuple)
  # Where the photometric ops (colour jitter, grayscale, blur, solarize) and the normalisation
  # run: "host" (tf.data, float32 views shipped), "device" (tf.data only decodes, crops, resizes
  # and flips, and ships uint8 views with each example's drawn parameters; the ops run in the
  # jitted train step, sharded with the batch: jaxcontrast/data/augment_jax.py), or "auto":
  # device on GPU / TPU, host on CPU (where both share the same cores; docs/data.md).
  c.augment_on = "auto"
  # Antialiased shrink in RandomResizedCrop, as PIL / torchvision (False: plain bilinear, about
  # 1.4x faster input on ImageNet-sized JPEGs; see benchmarks/bench_data.py).
  c.antialias = True
  # tf.data private thread pool size (big_vision: 48); 0 = the default shared pool.
  c.threadpool_size = 48
  # tf.data's autotuning (a model thread that re-tunes parallel calls and buffers). Off, parallel
  # maps use every host core. On, TensorFlow (2.21) blocks the destruction of an iterator (the
  # end of a run) until that thread's next wake-up (42 s seen; docs/data.md).
  c.autotune = False
  return c
