"""The cluster launchers, run with --dry-run (no gcloud, no SLURM, no network): the commands
they would run, in order, with the flags passed through."""
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
  return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True,
                        text=True, timeout=60, check=False)


TPU = ["--name", "pod1", "--zone", "us-central2-b", "--config", "configs/moco_imagenet2012.py",
       "--workdir", "gs://bucket/runs/moco", "--data_dir", "gs://bucket/tfds", "--dry-run"]


def test_tpu_pod_dry_run_prints_every_step_in_order():
  out = _run("tpu_pod.sh", *TPU, "--accelerator", "v4-32", "--spot", "--config.num_epochs=3")
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if l.startswith("+ ")]
  steps = ["tpu-vm describe pod1", "tpu-vm create pod1", "git -C", "tpu-vm scp",
           "--worker=all --command 'rm -rf ~/jaxcontrast", "VERSIONS", "jaxcontrast.main"]
  assert len(lines) == len(steps), out.stdout
  for line, step in zip(lines, steps):
    assert step in line, (step, line)
  create = lines[1]
  assert "--accelerator-type v4-32" in create and "--version tpu-ubuntu2204-base" in create
  assert "--spot" in create and "--zone us-central2-b" in create
  assert "archive --format=tar.gz" in lines[2] and lines[2].endswith("HEAD")
  assert "-e '\\''.[train,tpu]'\\''" in lines[4] and "-c launch/constraints.txt" in lines[4]
  train = lines[6]
  for arg in ("--config=configs/moco_imagenet2012.py", "--workdir=gs://bucket/runs/moco",
              "--config.data.data_dir=gs://bucket/tfds", "--config.num_epochs=3"):
    assert train.count(arg) == 2, arg      # worker 0 (tee'd here) and the others (to a log)
  assert "agent-worker-number" in train and "tee ~/train.log" in train
  assert "end in 16 devices" in out.stdout    # v4-32: 32 TensorCores = 16 chips
  assert "resume: run this same command again" in out.stdout
  assert "tpu-vm delete pod1 --zone us-central2-b --quiet" in out.stdout


@pytest.mark.parametrize("accelerator,devices", [("v5litepod-64", 64), ("v5p-128", 64),
                                                 ("v3-8", 8)])
def test_tpu_pod_expected_device_count(accelerator, devices):
  out = _run("tpu_pod.sh", *TPU, "--accelerator", accelerator)
  assert out.returncode == 0, out.stderr
  assert f"end in {devices} devices" in out.stdout
  assert "--spot" not in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--name", "p", "--zone", "z", "--dry-run"], "missing --accelerator --config --workdir"),
    (TPU[:6] + ["--workdir", "/local/runs", "--accelerator", "v4-8", "--dry-run"],
     "--workdir must be a gs:// path"),
    (["--zone"], "--zone needs a value")])
def test_tpu_pod_rejects_bad_arguments(args, message):
  out = _run("tpu_pod.sh", *args)
  assert out.returncode == 2 and message in out.stderr, out.stderr


def test_gpu_slurm_dry_run_writes_the_sbatch_script():
  out = _run("gpu_slurm.sh", "--nodes", "4", "--gpus_per_node", "8", "--partition", "gpu",
             "--config", "configs/sce_imagenet2012.py", "--workdir", "/shared/runs/sce",
             "--data_dir", "/shared/tfds", "--config.global_batch_size=4096", "--dry-run")
  assert out.returncode == 0, out.stderr
  text = out.stdout
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120", "#SBATCH --partition=gpu"):
    assert line in text.splitlines(), line
  srun = next(l for l in text.splitlines() if l.startswith("srun "))
  for arg in ("-m jaxcontrast.main", "--config=configs/sce_imagenet2012.py",
              "--workdir=/shared/runs/sce", "--config.data.data_dir=/shared/tfds",
              "--config.global_batch_size=4096"):
    assert arg in srun, arg
  assert 'trap "kill -TERM $pid" TERM' in text      # SIGTERM reaches the tasks: they save
  assert "CUDA_VISIBLE_DEVICES" not in text
  assert text.splitlines()[-1].startswith("+ sbatch ")


def test_gpu_slurm_one_process_per_gpu():
  out = _run("gpu_slurm.sh", "--nodes", "2", "--gpus_per_node", "4", "--per_gpu",
             "--config", "c.py", "--workdir", "/w", "--dry-run")
  assert out.returncode == 0, out.stderr
  assert "#SBATCH --ntasks-per-node=4" in out.stdout.splitlines()
  assert "export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in out.stdout


def test_gpu_slurm_rejects_bad_arguments():
  out = _run("gpu_slurm.sh", "--nodes", "0", "--config", "c.py", "--workdir", "/w", "--dry-run")
  assert out.returncode == 2 and "positive ints" in out.stderr
  out = _run("gpu_slurm.sh", "--nodes", "1", "--dry-run")
  assert out.returncode == 2 and "--config and --workdir are required" in out.stderr
