"""Input pipelines: tfds -> tf.data, augmentations, multi-view recipes, built-in datasets.

Submodules are imported on demand so that `jaxcontrast.data.fashion_mnist` (NumPy only) stays
cheap to import; TensorFlow is loaded by the pipeline modules only.
"""
