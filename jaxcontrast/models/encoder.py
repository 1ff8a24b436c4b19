"""The encoder used by every method: backbone -> projector (-> predictor).

The online (query) and target (key, EMA) networks are the same `Encoder` with the same
parameter tree: the target calls it with `predict=False` and simply never reads the predictor's
parameters (METHODS.md section 0: `f_k` = backbone + projector, no predictor). Initialisation
always creates the predictor's parameters, whatever `predict` says, so that the EMA tree and
the online tree match.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Encoder(nn.Module):
  """Backbone + projector + optional predictor.

  Attributes:
    backbone: module mapping images `(B, H, W, C)` to features `(B, F)`; called with `train`.
    projector: module `(B, F) -> (B, P)`; called with `train`.
    predictor: optional module `(B, P) -> (B, P')`; None for methods without one.
  """
  backbone: nn.Module
  projector: nn.Module
  predictor: nn.Module | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, predict: bool = True
               ) -> dict[str, jax.Array]:
    """Returns float32 `{"features", "projection"[, "prediction"]}`.

    `"prediction"` is present only when the encoder has a predictor and `predict` is True.
    Outputs are cast to float32 (losses, queue and softmax are float32) whatever the compute
    dtype.
    """
    features = self.backbone(x, train=train)
    projection = self.projector(features, train=train)
    out = {"features": features, "projection": projection}
    if self.predictor is not None and (predict or self.is_initializing()):
      prediction = self.predictor(projection, train=train)
      if predict:
        out["prediction"] = prediction
    return {k: v.astype(jnp.float32) for k, v in out.items()}
