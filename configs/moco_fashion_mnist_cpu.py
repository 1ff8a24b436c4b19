"""MoCo v2 on Fashion-MNIST in the main job's budget: ~10 min of pretraining on 2 CPU cores.

  bash launch/local.sh      # set-up, this pretraining, then the three linear probes
  python -m jaxcontrast.main --config configs/moco_fashion_mnist_cpu.py --workdir /tmp/moco_fashion_mnist_cpu
  python -m jaxcontrast.main --config configs/moco_fashion_mnist_cpu.py:long --workdir /tmp/moco_fashion_mnist_cpu_long
  python -m jaxcontrast.main --config configs/moco_fashion_mnist_cpu.py:tiny --workdir /tmp/moco_fashion_mnist_cpu_tiny  # smoke
  python -m jaxcontrast.eval.linear_probe --workdir /tmp/moco_fashion_mnist_cpu   # + --config.encoder=random|pixels

Loss: docs/METHODS.md §1; recipe: MoCo's CIFAR-10 demo (configs/moco_fashion_mnist.py) changed
for the budget as follows. The budget every method shares is `common.cpu`
(`configs/<method>_fashion_mnist.py:cpu`); this file adds MoCo's temperature. Why these choices (measured 2026-11-27 on the 2-core machine while
other jobs ran, load 7-18, so images/s are contended; linear probe = logistic regression on
standardised pooled backbone features of the target encoder):

* Stem: ResNet-18 width 1/4 with the CIFAR stem runs ~250 images/s on 2 idle cores; 2.4 epochs
  gave a probe of 81.7% against 78.5% for the same encoder at initialisation. The stride-2 stem
  (`cifar_s2`, 14x14 maps in stage 1) costs ~4 ms of CPU per image for a training step
  (~250 images per CPU-second), which buys ~4 epochs in 10 minutes.
* Optimizer: the demo's SGD lr 0.06 (batch 256, cosine, 400 steps = 1.7 epochs) made the
  features WORSE than at initialisation (probe 74.3% against 77.2% for the randomly initialised
  stride-2 encoder): the InfoNCE loss rose again after the first epoch (6.79 at step 200, 7.66
  at 400) and the instance accuracy fell to 0.4%; SGD lr 0.2 collapsed (loss 7.94 ~ log K,
  accuracy 73% from near-identical logits). AdamW lr 1e-3 (warm-up 0.1 epoch, cosine) with BN
  in the projector, tau 0.2 and crops of 30-100% of the image: the loss fell steadily (6.94,
  6.71, 6.49, 6.31 at steps 100-400), probe 78.2% at 1.7 epochs (20,000 train rows), kNN 73.5%.
* Crops: RandomResizedCrop 0.3-1 instead of 0.2-1 (a 20% crop of a 28x28 garment loses most
  of it); no change to the photometric recipe (colour jitter acts on grayscale as brightness
  and contrast only).
* Batch 256, K 4096, m 0.99, 8-group ghost BN: the CIFAR demo's.
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")
moco_fashion_mnist = config_lib.load_sibling(__file__, "moco_fashion_mnist")


def long(c):
  """`bash launch/local.sh --long`: the same recipe, 3x longer (PROVISIONAL: the number of
  epochs at which the probe beats raw pixels is still to be measured)."""
  c.num_epochs = 12


def get_config(arg=None):
  c = moco_fashion_mnist.get_config()  # MoCo v2, the CIFAR-10 demo recipe (common.moco_cifar_demo)
  common.cpu(c)                        # the budget every method shares (see common.cpu)
  c.objective.temperature = 0.2        # MoCo v2 ImageNet's tau (the demo: 0.1)
  return common.finish(c, arg, long=long)
