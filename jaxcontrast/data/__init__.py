"""Input pipelines: tfds -> tf.data, augmentations, multi-view recipes, built-in datasets.

Public API (imported on first use, so that `jaxcontrast.data.fashion_mnist`, which is NumPy only,
stays cheap to import; TensorFlow is loaded by the pipeline modules only):

  default_data_config()                         config.py
  make_train_dataset(cfg, *, batch_size, seed, process_index=None, process_count=None)
  make_train_iterator(...)                      same arguments, NumPy dicts
  make_eval_dataset(cfg, *, batch_size, split=None, process_index=None, process_count=None)
  dataset_info(cfg)                             pipeline.py
  load_fashion_mnist_numpy(split, directory)    fashion_mnist.py
"""
import importlib

_LAZY = {
    "default_data_config": "jaxcontrast.data.config",
    "make_train_dataset": "jaxcontrast.data.pipeline",
    "make_train_iterator": "jaxcontrast.data.pipeline",
    "make_eval_dataset": "jaxcontrast.data.pipeline",
    "dataset_info": "jaxcontrast.data.pipeline",
    "load_fashion_mnist_numpy": "jaxcontrast.data.fashion_mnist",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'jaxcontrast.data' has no attribute {name!r}")
