"""Pretraining: `python -m jaxcontrast.main --config configs/moco_fashion_mnist.py --workdir DIR`.

`--config path.py:variant` passes `variant` to `get_config` (e.g. `:tiny`); any key can be
overridden on the command line (`--config.queue.size=8192`; `--help` lists them). `--workdir`
is a local folder or a gs:// path; running the same command again resumes from its latest
checkpoint. Runs on one process or many (TPU pod workers, SLURM tasks:
`jax.distributed.initialize` auto-detects them). A mistake in the settings or the set-up (a key
or value, a dataset not prepared) is one line and exit status 2; a non-finite loss exit status 1.
Library logs are hidden; `--verbosity=0` or JAXCONTRAST_VERBOSE=1 shows them.
"""
import logging
import os
import sys

from absl import flags

from jaxcontrast import cli, config_lib
from jaxcontrast.sharding import define_distributed_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here; resumes.")
_INITIALIZE_DISTRIBUTED = define_distributed_flags()   # --coordinator_address etc.
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  config_lib.validate_config(flags.FLAGS.config)   # the overrides, before any work
  os.environ.update(cli.quiet_environment())       # before TensorFlow is imported
  from jaxcontrast.run import pretrain  # pylint: disable=g-import-not-at-top
  _INITIALIZE_DISTRIBUTED()
  try:
    pretrain.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)
  except pretrain.NonFiniteLossError as e:
    logging.getLogger("jaxcontrast").error("%s", e)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, config_file=True)
