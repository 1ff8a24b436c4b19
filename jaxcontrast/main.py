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

from jaxcontrast import config_lib
from jaxcontrast.run import pretrain
from jaxcontrast.sharding import maybe_initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (.py:variant).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here; resumes.")
# Multi-process runs where nothing can be auto-detected (TPU VMs and SLURM need none of these).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, with --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process, 0 .. num_processes - 1.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process at start-up; then fail "
    "(with the processes that did not connect named by JAX) instead of hanging.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax logs every save step at INFO.
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit) and None in explicit:
    raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
  maybe_initialize_distributed(*explicit, timeout_s=_DISTRIBUTED_TIMEOUT.value)
  try:
    pretrain.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except pretrain.NonFiniteLossError as e:
    logging.getLogger("jaxcontrast").error("%s", e)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)  # Names a mistyped --config.<key>.
