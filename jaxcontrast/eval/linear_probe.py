"""Linear probe of a pretrained run: `python -m jaxcontrast.eval.linear_probe --workdir DIR`.

  python -m jaxcontrast.eval.linear_probe --workdir /tmp/moco_fmnist
  python -m jaxcontrast.eval.linear_probe --workdir /tmp/moco_fmnist --config.encoder=random
  python -m jaxcontrast.eval.linear_probe --workdir /tmp/moco_fmnist \\
      --config.encoder=target,random,pixels       # three probes, one process (launch/local.sh)
  python -m jaxcontrast.eval.linear_probe --workdir gs://bucket/moco_in1k --config.protocol=sgd
  python -m jaxcontrast.eval.linear_probe --workdir /tmp/probe_mocov2 \
      --config.encoder=torchvision:moco_v2_800ep_pretrain.pth.tar \
      --config.data.dataset=imagenet2012          # someone else's PyTorch ResNet weights

Loads the run (config, checkpoint) from DIR alone, embeds with the frozen encoder chosen by
`--config.encoder` (see `eval/config.py` for every key), trains a linear classifier on the
labelled train split and reports top-1 / top-5 on the test split:

* full_batch (small data): features computed once, standardised with train statistics,
  multinomial logistic regression by L-BFGS with the L2 strength chosen on held-out train rows
  (never on test), then refitted on the whole train split (`eval/logistic.py`);
* sgd (ImageNet scale): the MoCo v2 protocol, resumable (`eval/sgd.py`).

Writes DIR/<output>.json (process 0) with the accuracies, the encoder, the checkpoint step, the
chosen L2 and its held-out accuracy, timings and every probe setting, and prints one summary line.
`--help` lists the keys. A bad key or value, a workdir without a checkpoint or a dataset not
prepared is one line and exit status 2; `--verbosity=0` or JAXCONTRAST_VERBOSE=1 shows the
libraries' logs.
"""
from __future__ import annotations

import json
import logging
import time

import jax
import ml_collections
import numpy as np

from jaxcontrast.config_check import fail
from jaxcontrast.errors import ConfigError
from jaxcontrast.eval import config as config_lib
from jaxcontrast.eval import encoders
from jaxcontrast.eval import features as features_lib
from jaxcontrast.eval import logistic
from jaxcontrast.eval import sgd as sgd_lib
from jaxcontrast.sharding import make_mesh

log = logging.getLogger("jaxcontrast")


def probe_data_config(run_config, probe_config) -> ml_collections.ConfigDict:
  """The run's data config (image size, channels, normalisation) with the probe's splits."""
  cfg = run_config.data.copy_and_resolve_references()
  cfg.unlock()
  cfg.train_split = probe_config.train_split
  if probe_config.test_split:
    cfg.eval_split = probe_config.test_split
  if probe_config.data_dir:
    cfg.data_dir = probe_config.data_dir
  return cfg


def _topk(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
  out = {"top1": logistic.accuracy(scores, labels, 1)}
  if num_classes > 5:
    out["top5"] = logistic.accuracy(scores, labels, 5)
  return out


def fit_and_evaluate(x_train, y_train, x_test, y_test, *, num_classes: int, full_batch_config,
                     seed: int = 0) -> dict:
  """The full-batch protocol on precomputed features.

  1. L2 chosen on a held-out part of the TRAIN rows (`logistic.select_l2`);
  2. standardise with all train rows' statistics, refit on all train rows with that L2;
  3. only then score the test rows (top-1, top-5).
  """
  fb = full_batch_config
  selection = logistic.select_l2(x_train, y_train, num_classes=num_classes, l2_grid=fb.l2_grid,
                                 held_out_fraction=fb.held_out_fraction, seed=seed,
                                 max_iter=fb.max_iter, tol=fb.tol)
  std = logistic.Standardizer.fit(x_train)
  # Warm start from the chosen held-out fit: same L2, 90% of the rows, nearly the solution.
  params, fit_info = logistic.fit_logistic(std(x_train), y_train, num_classes=num_classes,
                                           l2=selection["l2"], max_iter=fb.max_iter, tol=fb.tol,
                                           init=selection["params"])
  # Test data enters only here, after the choice.
  result = _topk(logistic.predict_scores(params, std(x_test)), y_test, num_classes)
  result.update(l2=selection["l2"], held_out_top1=selection["held_out_top1"],
                held_out_size=selection["held_out_size"], l2_grid=selection["grid"],
                train_top1=logistic.accuracy(logistic.predict_scores(params, std(x_train)),
                                             y_train),
                fit=fit_info, num_train=int(len(y_train)), num_test=int(len(y_test)),
                feature_dim=int(np.shape(x_train)[1]))
  return result


def full_batch_probe(enc, data_cfg, probe_config, *, mesh, num_classes) -> dict:
  """Features of both splits once, then `fit_and_evaluate`."""
  extractor = features_lib.FeatureExtractor(enc.apply_fn, mesh=mesh)
  t0 = time.perf_counter()
  x_train, y_train = extractor.host_features(enc.variables, data_cfg, split=data_cfg.train_split,
                                             batch_size=probe_config.batch_size)
  x_test, y_test = extractor.host_features(enc.variables, data_cfg, split=None,
                                           batch_size=probe_config.batch_size)
  t1 = time.perf_counter()
  if (y_train < 0).any() or (y_test < 0).any():
    split = "train_split" if (y_train < 0).any() else "test_split"
    fail("", split, probe_config[split], "a labelled split (found label -1)")
  result = fit_and_evaluate(x_train, y_train, x_test, y_test, num_classes=num_classes,
                            full_batch_config=probe_config.full_batch, seed=probe_config.seed)
  result["seconds"] = {"features": round(t1 - t0, 3),
                       "solver": round(time.perf_counter() - t1, 3)}
  return result


def sgd_probe(enc, data_cfg, probe_config, *, mesh, workdir, num_classes, num_train) -> dict:
  """MoCo v2 linear classification; checkpoints in WORKDIR/<output stem>_sgd/."""
  from jaxcontrast.run import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt_dir = (checkpoint.workdir_path(workdir) /
              f"{config_lib.output_stem(probe_config)}_sgd")
  t0 = time.perf_counter()
  params, info = sgd_lib.train_linear_sgd(
      apply_fn=enc.apply_fn, variables=enc.variables, data_config=data_cfg,
      sgd_config=probe_config.sgd, num_classes=num_classes, num_train=num_train, mesh=mesh,
      checkpoint_dir=ckpt_dir, seed=probe_config.seed)
  t1 = time.perf_counter()
  extractor = features_lib.FeatureExtractor(sgd_lib.classifier_apply(enc.apply_fn), mesh=mesh)
  scores, y_test = extractor.host_features({"encoder": enc.variables, "probe": params}, data_cfg,
                                           split=None, batch_size=probe_config.batch_size)
  result = _topk(scores, y_test, num_classes)
  result.update(info, num_train=int(num_train), num_test=int(len(y_test)),
                checkpoint_dir=str(ckpt_dir),
                seconds={"train": round(t1 - t0, 3), "eval": round(time.perf_counter() - t1, 3)})
  return result


def run_probe(workdir, probe_config, *, mesh=None) -> dict:
  """Probes the run in `workdir` per `probe_config` (`default_probe_config()`); writes the JSON
  result (process 0) and returns it."""
  from jaxcontrast.run import checkpoint  # pylint: disable=g-import-not-at-top
  config_lib.validate(probe_config)
  if len(config_lib.encoder_list(probe_config)) > 1:
    raise ValueError(f"run_probe probes one encoder, got {probe_config.encoder!r}: call it for "
                     "each config of config_lib.split_encoders(probe_config)")
  mesh = make_mesh() if mesh is None else mesh
  start = time.perf_counter()
  # The run's data config first (the random encoder needs its image shape); for PyTorch
  # weights (encoder="torchvision:PATH") the data comes from --config.data.*.
  saved_config, saved_step = encoders.probe_run_config(
      workdir, encoder=probe_config.encoder, step=probe_config.step,
      data_overrides=probe_config.data.to_dict())
  data_cfg = probe_data_config(saved_config, probe_config)
  # TensorFlow (the input pipeline) only once there is a run to probe: a workdir without a
  # checkpoint is reported without its import.
  from jaxcontrast.data import pipeline  # pylint: disable=g-import-not-at-top
  info = pipeline.dataset_info(data_cfg)
  num_classes, num_train = info["num_classes"], info["num_train"]
  if not num_classes:
    raise ConfigError(f"linear probe: the run's dataset {data_cfg.dataset!r} has no labels")
  enc = encoders.load_probe_encoder(workdir, encoder=probe_config.encoder,
                                    features=probe_config.features, step=saved_step,
                                    mesh=mesh, seed=probe_config.seed,
                                    image_shape=info["image_shape"], run_config=saved_config)
  auto = ("full_batch" if num_train is not None
          and num_train <= probe_config.full_batch_max_train else "sgd")
  protocol = auto if probe_config.protocol == "auto" else probe_config.protocol
  if protocol == "full_batch":
    result = full_batch_probe(enc, data_cfg, probe_config, mesh=mesh, num_classes=num_classes)
  else:
    if num_train is None:   # tfds does not know the size (e.g. mock data).
      if not probe_config.sgd.total_steps:
        fail("sgd", "total_steps", probe_config.sgd.total_steps,
             "an int >= 1: the train split's size is unknown")
      num_train = (probe_config.sgd.total_steps * probe_config.sgd.batch_size
                   // max(1, probe_config.sgd.epochs))
    result = sgd_probe(enc, data_cfg, probe_config, mesh=mesh, workdir=workdir,
                       num_classes=num_classes, num_train=num_train)
  result = {**result, "encoder": probe_config.encoder, "features": probe_config.features,
            "protocol": protocol, "step": enc.step, "workdir": str(workdir),
            "method": saved_config.get("method"), "dataset": data_cfg.dataset,
            "train_split": data_cfg.train_split, "test_split": data_cfg.get("eval_split"),
            "total_seconds": round(time.perf_counter() - start, 3),
            "probe_config": checkpoint.config_to_dict(probe_config)}
  # A protocol forced against the automatic choice gets its own file (linear_probe_sgd.json).
  stem = config_lib.output_stem(probe_config) + ("" if protocol == auto else f"_{protocol}")
  name = probe_config.output or f"{stem}.json"
  path = checkpoint.workdir_path(workdir) / name
  result["output"] = str(path)
  if jax.process_index() == 0:
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
  return result


def summary_line(result: dict) -> str:
  line = (f"linear probe ({result['protocol']}) {result['encoder']}/{result['features']} "
          f"step {result['step']}: top1 {100 * result['top1']:.2f}%")
  if "top5" in result:
    line += f" top5 {100 * result['top5']:.2f}%"
  if "l2" in result:
    line += (f" (l2 {result['l2']:g}, held-out top1 {100 * result['held_out_top1']:.2f}%)")
  return line + f" -> {result['output']}"


def run_probes(workdir, probe_config, *, mesh=None) -> list[dict]:
  """`run_probe` for each encoder of `probe_config.encoder` ("target,random,pixels"), in one
  process: one start-up, one mesh."""
  mesh = make_mesh() if mesh is None else mesh
  return [run_probe(workdir, one, mesh=mesh) for one in config_lib.split_encoders(probe_config)]


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxcontrast.sharding import define_distributed_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "The pretraining run's workdir.")
  flags.mark_flag_as_required("workdir")
  return define_distributed_flags()


def main(argv, initialize_distributed) -> None:
  """After `cli.run` parsed the flags: --workdir, --config.KEY=VALUE (eval/config.py)."""
  del argv
  import os  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from jaxcontrast import cli  # pylint: disable=g-import-not-at-top
  probe_configs = config_lib.split_encoders(flags.FLAGS.config)   # checks every key first
  os.environ.update(cli.quiet_environment())   # before TensorFlow is imported
  initialize_distributed()
  mesh = make_mesh()
  for probe_config in probe_configs:
    result = run_probe(flags.FLAGS.workdir, probe_config, mesh=mesh)
    if jax.process_index() == 0:
      print(summary_line(result), flush=True)


if __name__ == "__main__":
  import functools  # pylint: disable=g-import-not-at-top
  from jaxcontrast import cli  # pylint: disable=g-import-not-at-top
  cli.run(functools.partial(main, initialize_distributed=_define_flags()),
          config=config_lib.default_probe_config)
