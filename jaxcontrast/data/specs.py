"""Dataset names -> `DatasetSpec`: the tfds dataset a config name reads, its splits, default
image size and normalisation statistics. No TensorFlow: `data.config.normalization` (and so
`jaxcontrast.load_encoder`) looks statistics up here; the names' meaning is described in
`datasets.py`, which builds the tfds readers from these specs.
"""
import dataclasses

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about a dataset beyond its tfds info."""
  tfds_name: str
  train_split: str = "train"
  eval_split: str = "test"
  image_size: int | None = None  # Default crop size; None = the image feature's side.
  mean: tuple[float, ...] = _IMAGENET_MEAN
  std: tuple[float, ...] = _IMAGENET_STD
  eval_crop_ratio: float = 1.0
  unlabeled_splits: tuple[str, ...] = ()  # Splits whose labels are meaningless (-> -1).
  local: bool = False  # Prepared automatically from local files (never downloads).
  # Spec used when `tfds_name` is not prepared in data_dir (a `local` one), or None.
  fallback: "DatasetSpec | None" = None
  image_key: str = "image"
  label_key: str = "label"


# Fashion-MNIST train-split statistics (the same images in both sources).
_FASHION_MNIST_DEBIAN = DatasetSpec("fashion_mnist_debian", image_size=28, mean=(0.2860,),
                                    std=(0.3530,), local=True)
KNOWN_DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": dataclasses.replace(_FASHION_MNIST_DEBIAN, tfds_name="fashion_mnist",
                                         local=False, fallback=_FASHION_MNIST_DEBIAN),
    "fashion_mnist_debian": _FASHION_MNIST_DEBIAN,
    # MoCo's CIFAR demo statistics.
    "cifar10": DatasetSpec("cifar10", image_size=32, mean=(0.4914, 0.4822, 0.4465),
                           std=(0.2023, 0.1994, 0.2010)),
    "cifar100": DatasetSpec("cifar100", image_size=32, mean=(0.5071, 0.4865, 0.4409),
                            std=(0.2673, 0.2564, 0.2762)),
    "stl10": DatasetSpec("stl10", train_split="unlabelled", image_size=96,
                         mean=(0.4408, 0.4279, 0.3867), std=(0.2682, 0.2610, 0.2686),
                         unlabeled_splits=("unlabelled",)),
    "imagenet2012": DatasetSpec("imagenet2012", eval_split="validation", image_size=224,
                                eval_crop_ratio=0.875),
}
TFDS_PREFIX = "tfds:"


def get_spec(name: str) -> DatasetSpec:
  """The spec of a config dataset name. "tfds:<name>" is tfds' dataset only (no fallback), with
  the statistics of the known dataset of that tfds name, else ImageNet-style defaults."""
  if name in KNOWN_DATASETS:
    return KNOWN_DATASETS[name]
  if name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX):
    tfds_name = name[len(TFDS_PREFIX):]
    for spec in KNOWN_DATASETS.values():
      if spec.tfds_name == tfds_name:
        return dataclasses.replace(spec, fallback=None)
    return DatasetSpec(tfds_name, eval_crop_ratio=0.875)
  raise ValueError(f"Unknown dataset {name!r}. Known datasets: {sorted(KNOWN_DATASETS)}; any "
                   f"other prepared tfds dataset as '{TFDS_PREFIX}<tfds name>'.")


def pinned_name(source: str) -> str:
  """The config `data.dataset` that reads `source` (`datasets.source_name`, what a checkpoint
  records) whatever `data_dir` holds: a local dataset's own name ("fashion_mnist_debian"), else
  "tfds:<source>"."""
  spec = KNOWN_DATASETS.get(source)
  if spec is not None and spec.local:
    return source
  return TFDS_PREFIX + source
