"""Pure-function contrastive losses: jax.numpy only (no Flax, no TensorFlow).

One convention for every function: arrays are positional, every hyper-parameter keyword-only with
the paper's (or official code's) default, and the return value is `(loss, metrics)` with
`metrics` a dict of scalar arrays (`fnc_detect` returns its mask in place of the loss).
Functions normalise `query`/`key` and the queue rows themselves, stop gradients through keys
(`stop_gradient=False` lets them flow, as in SimCLR), queues and support views, and compute
softmaxes in float32. Similarity products run at `lax.Precision.HIGHEST` (`precision=` to change
it: the GPU/TPU default rounds to TF32 / one bfloat16 pass, which the temperature magnifies).
With `axis_name` they run inside `jax.shard_map` with the batch and the queue split over that
mesh axis and return the same loss and gradients as the unsharded call on the concatenated
arrays; an input that is not split over it is an error. `jaxcontrast.losses.queue` holds the
negative queue itself (enqueue, valid rows) as pure functions.

| function                      | method                 | source / status          |
|-------------------------------|------------------------|--------------------------|
| moco_infonce                  | MoCo v2, CLIP in-batch | official code (exact)    |
| nt_xent                       | SimCLR                 | official code (exact)    |
| sce                           | SCE                    | official code (exact)    |
| co2_consistency               | CO2 regulariser        | paper; tau, alpha unverified |
| xmoco_cross_consistency       | XMoCo (a)              | interpretation           |
| xmoco_negative_uniformity     | XMoCo (b)              | interpretation           |
| fnc                           | FNC on a MoCo queue    | code (detection, attraction), paper (elimination) |
| fnc_multiview                 | FNC official form      | official code (parity)   |
| fnc_detect                    | FNC's detection alone  | official code (diagnostics) |
| multi_positive_infonce        | SePP queue ids, FNC    | known positive mask      |
"""
from jaxcontrast.losses._core import l2_normalize
from jaxcontrast.losses.co2 import co2_consistency
from jaxcontrast.losses.fnc import fnc, fnc_detect, fnc_multiview
from jaxcontrast.losses import queue
from jaxcontrast.losses.infonce import moco_infonce, multi_positive_infonce, nt_xent
from jaxcontrast.losses.sce import sce
from jaxcontrast.losses.xmoco import xmoco_cross_consistency, xmoco_negative_uniformity

__all__ = [
    "l2_normalize", "moco_infonce", "nt_xent", "multi_positive_infonce", "sce", "co2_consistency",
    "xmoco_cross_consistency", "xmoco_negative_uniformity", "fnc", "fnc_multiview", "fnc_detect",
    "queue",
]
