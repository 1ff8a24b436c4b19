"""SCE (similarity contrastive estimation) on ImageNet (ILSVRC-2012), ResNet-50, 200 epochs.

  python -m jaxcontrast.main --config configs/sce_imagenet2012.py --workdir /tmp/sce_imagenet2012
  python -m jaxcontrast.main --config configs/sce_imagenet2012.py:multicrop --workdir /tmp/sce_imagenet2012_mc
  python -m jaxcontrast.main --config configs/sce_imagenet2012.py:tiny --workdir /tmp/sce_imagenet2012_tiny  # smoke

imagenet2012 must be prepared in the tfds data_dir (add --config.data.data_dir=gs://.../tfds).
Loss and recipe: docs/METHODS.md §2, from the official code (CEA-LIST/SCE) unless marked.
Reported: linear top-1 72.1 / 72.7 / 73.3 / 74.1 at 100 / 200 / 300 / 1000 epochs; 75.4 with
multi-crop (`:multicrop`, 200 epochs).
"""
from jaxcontrast import config_lib

common = config_lib.load_sibling(__file__, "common")


def multicrop(c):
  """SCE's multi-crop recipe, 2 x 224 + 192 + 160 + 128 + 96 (reported 75.4% at 200 epochs), from
  the official eztorch configs `run/pretrain/sce/resnet50/resnet50_imagenet_five_crops.yaml`,
  `transform/crops/imagenet_five_crops.yaml` and `transform/contrastive/imagenet_five_crops_sce`:

  * global crops RandomResizedCrop (0.2, 1) (the two-crop recipe: (0.08, 1));
  * local crop of size s: area range (0.2, 1) x s / 224 (0.172-0.86, 0.143-0.715, 0.114-0.571,
    0.086-0.429), view 1's photometric ops with blur p = 0.5 and solarize p = 0.2;
  * each local crop is an extra online query against both global keys (and their SCE targets);
    the loss is the mean over the 2 x 5 pairs (`objectives.crop_pairs`); only the global keys are
    enqueued;
  * projector hidden layers 4096-4096 (the five-crop config's `projector.hidden_dims`);
    everything else as the two-crop recipe above.
  """
  c.data.view1.crop_scale = c.data.view2.crop_scale = (0.2, 1.0)
  c.data.local_crop_sizes = (192, 160, 128, 96)
  c.data.local_crop_scale = ((0.172, 0.86), (0.143, 0.715), (0.114, 0.571), (0.086, 0.429))
  c.data.local_view.update(blur_prob=0.5, solarize_prob=0.2)
  c.model.proj_hidden_dims = (4096, 4096)


def get_config(arg=None):
  c = common.base("sce", "imagenet2012")
  # Loss: cross-entropy to coeff * one-hot + (1 - coeff) * softmax(target similarities / tau_m).
  c.objective.loss = "sce"
  c.objective.temperature = 0.1                  # tau
  c.objective.sce.target_temperature = 0.07      # tau_m
  c.objective.sce.coeff = 0.5                    # lambda
  c.objective.sce.mask_self = False              # code: self logit 0 (paper: -inf)
  c.objective.symmetric = True                   # both views as queries, both keys enqueued
  c.data.recipe = "sce_imagenet"                 # BYOL aug: view 1 blur 1.0; view 2 blur 0.1,
  #                                                solarize 0.2
  # Encoders: R50; projector 2048-2048-256 with BN (last BN without affine); predictor
  # 256-4096-256 with BN, online branch only.
  c.model.update(arch="resnet50", stem="imagenet", proj_hidden_dims=(2048,), proj_dim=256,
                 proj_bn=True, proj_last_bn=True, pred_hidden_dims=(4096,), pred_dim=256,
                 pred_bn=True)
  c.bn.mode = "sync"                             # SyncBN over the global batch
  # Target: EMA 0.99 -> 1 on a cosine schedule, after the optimizer step, not copied at start.
  c.ema.update(momentum=0.99, schedule="cosine", update_at="after_step", init="independent")
  c.queue.size = 65536                           # K
  # Optimizer: LARS, lr 0.3 x B/256 (4.8 at 4096), wd 1e-6, no wd / trust ratio on biases and
  # norm parameters, 10 warm-up epochs, cosine.
  c.global_batch_size = 4096
  c.num_epochs = 200
  c.optim.update(name="lars", base_lr=0.3, lr_scaling="linear", momentum=0.9, weight_decay=1e-6,
                 exclude_1d_from_wd=True, schedule="cosine")
  c.optim.trust_coefficient = 1e-3               # unverified (LARS' usual value)
  c.optim.warmup_epochs = 10
  return common.finish(c, arg, multicrop=multicrop)
