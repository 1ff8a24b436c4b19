"""Entry point: `python -m jaxcontrast.main --config configs/moco_fashion_mnist.py --workdir DIR`.

`--config path.py:variant` passes `variant` to `get_config` (e.g. `:tiny`); any key can be
overridden on the command line (`--config.queue.size=8192`). `--workdir` is a local folder or a
gs:// path; running the same command again resumes from its latest checkpoint. Runs on one
process or many (TPU pod workers, SLURM tasks: `jax.distributed.initialize` auto-detects them).
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxcontrast import config_lib, xla_cpu
from jaxcontrast.run import checkpoint, pretrain
from jaxcontrast.sharding import define_distributed_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (.py:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here; resumes.")
_INITIALIZE_DISTRIBUTED = define_distributed_flags()   # --coordinator_address etc.
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  xla_cpu.apply()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax logs every save step at INFO.
  try:
    _INITIALIZE_DISTRIBUTED()
  except flags.ValidationError as e:
    raise app.UsageError(str(e)) from e
  try:
    pretrain.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except pretrain.NonFiniteLossError as e:
    logging.getLogger("jaxcontrast").error("%s", e)
    sys.exit(1)
  except checkpoint.CheckpointError as e:   # A checkpoint that does not fit or cannot be read.
    logging.getLogger("jaxcontrast").error("%s", e)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)  # Names a mistyped --config.<key>.
