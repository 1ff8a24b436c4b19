"""Evaluation of pretrained encoders (METHODS.md §7): linear probe, kNN monitor, features.

  python -m jaxcontrast.eval.linear_probe --workdir DIR [--config.KEY=VALUE]   linear_probe.py
  KnnMonitor(config, mesh=mesh, model=models.target)(params, batch_stats)     knn.py

Files, one job each:
  features.py      frozen encoder -> features of an eval split (global arrays / host NumPy)
  encoders.py      load_encoder (one network from a checkpoint); what a probe embeds: target,
                   online, random, pixels, torchvision:PATH
  knn.py           cosine k-NN weighted vote, sharded memory; the training loop's monitor
  logistic.py      full-batch multinomial logistic regression (L-BFGS), held-out L2 choice
  sgd.py           MoCo v2 linear classification by SGD on a frozen encoder, resumable
  config.py        the probe's config (`default_probe_config`)
  linear_probe.py  the command line: load the run, pick the protocol, write the JSON result
"""
