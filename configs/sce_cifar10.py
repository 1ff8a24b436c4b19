"""SCE (similarity contrastive estimation) on CIFAR-10 with SCE's small-dataset recipe.

  python -m jaxcontrast.main --config configs/sce_cifar10.py --workdir /tmp/sce_cifar10
  python -m jaxcontrast.main --config configs/sce_cifar10.py:tiny --workdir /tmp/sce_cifar10_tiny  # smoke

CIFAR-10 must be prepared in the tfds data_dir (add --config.data.data_dir=DIR). Loss and
recipe: docs/METHODS.md §2 (official code CEA-LIST/SCE). Batch 512, its unscaled lr and 200
epochs come from MoCo's CIFAR demo: UNVERIFIED for SCE. configs/sce_fashion_mnist.py runs this
recipe on Fashion-MNIST.
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def get_config(arg=None, dataset="cifar10"):
  c = common.base("sce", dataset)
  # Loss: cross-entropy to coeff * one-hot + (1 - coeff) * softmax(target similarities / tau_m).
  c.objective.loss = "sce"
  c.objective.temperature = 0.1                  # tau
  c.objective.sce.target_temperature = 0.05      # tau_m (CIFAR; ImageNet 0.07)
  c.objective.sce.coeff = 0.5                    # lambda
  c.objective.sce.mask_self = False              # code: self logit 0 (paper: -inf)
  c.objective.symmetric = False                  # asymmetric: strong view online, weak target
  c.data.recipe = "sce_cifar"                    # view 1 MoCo CIFAR aug, view 2 crop + flip only
  # Encoders: R18 CIFAR stem, projector 512-512-128 without BN, no predictor.
  c.model.update(arch="resnet18", stem="cifar", proj_hidden_dims=(512,), proj_dim=128,
                 proj_bn=False, proj_last_bn=False, pred_hidden_dims=(), pred_dim=0)
  c.bn.update(mode="ghost", groups=8, target_only=True)   # 8-group split BN, target only
  # Target: constant EMA 0.99, updated after the optimizer step, not copied at start (code).
  c.ema.update(momentum=0.99, schedule="constant", update_at="after_step", init="independent")
  c.queue.size = 4096                            # K
  # Optimizer: SGD lr 0.06 wd 5e-4, 5 warm-up epochs, cosine.
  c.global_batch_size = 512                      # unverified (MoCo's demo)
  c.num_epochs = 200                             # unverified (MoCo's demo)
  c.optim.update(name="sgd", base_lr=0.06, lr_scaling="none", momentum=0.9, weight_decay=5e-4,
                 schedule="cosine")
  c.optim.warmup_epochs = 5
  return common.finish(c, arg)
