"""The benchmark harness: FLOP counting, the JSON it prints, the PyTorch reference's settings and
its clean skip without torch, the profile summary. Timings are printed by benchmarks, never
asserted here."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pod_helpers
from jaxcontrast import config_lib
from jaxcontrast.bench import flops as flops_lib
from jaxcontrast.bench import profile as profile_lib
from jaxcontrast.bench import torch_reference
from jaxcontrast.models import build_resnet
from test_data_helpers import fashion_dir  # noqa: F401  pylint: disable=unused-import

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _conv(x, w, stride):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_dot_flops_are_two_m_n_k():
  a, b = jnp.ones((3, 5)), jnp.ones((5, 7))
  assert flops_lib.count_flops(jnp.dot, a, b) == 2 * 3 * 7 * 5
  batched = lambda x, y: jnp.einsum("bij,bjk->bik", x, y)
  assert flops_lib.count_flops(batched, jnp.ones((4, 3, 5)), jnp.ones((4, 5, 7))) == \
      4 * 2 * 3 * 7 * 5


def test_strided_conv_forward_and_backward_count_three_forwards():
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  forward = 2 * (2 * 4 * 4 * 4) * (3 * 3 * 3)        # 2 * outputs * (C_in * kernel area)
  assert flops_lib.count_flops(lambda x, w: _conv(x, w, 2), x, w) == forward
  # Input and weight gradients: each as many useful multiply-adds as the forward (the input
  # gradient's transposed convolution multiplies stride^2 times more zeros, not counted).
  loss = lambda x, w: jnp.sum(_conv(x, w, 2))
  assert flops_lib.count_flops(jax.grad(loss, argnums=(0, 1)), x, w) == 3 * forward
  assert flops_lib.count_flops(jax.grad(loss, argnums=1), x, w) == 2 * forward


def test_scan_multiplies_by_its_length():
  def body(c, _):
    return c @ jnp.ones((4, 4)), None
  f = lambda c: jax.lax.scan(body, c, None, length=6)[0]
  assert flops_lib.count_flops(f, jnp.ones((2, 4))) == 6 * 2 * 2 * 4 * 4


def test_resnet50_forward_matches_the_published_count():
  """torchvision lists ResNet-50 at 4.09 G multiply-adds per 224 x 224 image (its 1000-way fc,
  2 M, included); our backbone without fc must count the same within 1%."""
  net = build_resnet("resnet50", stem="imagenet")
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                                    train=False))
  flops = flops_lib.count_flops(lambda v, x: net.apply(v, x, train=False), variables, x)
  macs = flops / 2 + 2048 * 1000
  assert macs == pytest.approx(4.09e9, rel=0.01)


def test_profile_summary_sums_device_kernels_by_kind():
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "name": "sm90_xmma_fprop_implicit_gemm_bf16", "dur": 3000.0},
      {"ph": "X", "pid": 1, "name": "input_reduce_fusion.3", "dur": 1000.0},
      {"ph": "X", "pid": 1, "name": "transpose_fusion", "dur": 500.0},
      {"ph": "X", "pid": 1, "name": "nvjet_tst_128x64", "dur": 250.0},
      {"ph": "X", "pid": 1, "name": "loop_multiply_fusion", "dur": 250.0},
      {"ph": "X", "pid": 2, "name": "conv host op", "dur": 9000.0},   # host: not device time
  ]
  s = profile_lib.summarize_trace({"traceEvents": events}, steps=2)
  assert s["device_ms_per_step"] == 2.5
  assert s["ms_per_step_by_kind"] == {"convolution": 1.5, "reduction": 0.5,
                                      "transpose_copy": 0.25, "matmul": 0.125, "other": 0.125}
  assert s["top_kernels"][0]["kind"] == "convolution"
  assert "error" in profile_lib.summarize_trace({"traceEvents": events[1:2]}, steps=1)


def test_torch_reference_mirrors_moco_v2_and_refuses_other_steps():
  c = config_lib.load_config("configs/moco_imagenet2012.py")
  s = torch_reference.reference_settings(c)
  assert (s["arch"], s["hidden"], s["proj_dim"], s["queue_size"], s["batch"]) == \
      ("resnet50", (2048,), 128, 65536, 256)
  assert (s["temperature"], s["momentum"], s["lr"], s["weight_decay"]) == (0.2, 0.999, 0.03, 1e-4)
  with pytest.raises(ValueError, match="loss 'sce'"):
    torch_reference.reference_settings(config_lib.load_config("configs/sce_imagenet2012.py"))


def test_cli_prints_one_json_object_and_skips_torch_cleanly(tmp_path):
  """The real entry point on a tiny config, with `torch` made unimportable; the photometric ops
  in the step (synthetic uint8 views and parameters, as the pipeline ships them). TensorFlow
  and tfds are unimportable too, as on the GPU machine benchmarks/gpu_step_suite.sh runs on: the
  step benchmark must not need them."""
  for package in ("torch", "tensorflow", "tensorflow_datasets"):
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(
        f"raise ImportError('no {package} in this test')\n")
  # One device, and the suite's fast-compile flags (conftest.py) kept.
  xla_flags = pod_helpers.process_xla_flags(1)
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", XLA_FLAGS=xla_flags)
  out = subprocess.run(
      [sys.executable, "-m", "jaxcontrast.bench", "--config", "configs/moco_imagenet2012.py:tiny",
       "--steps", "2", "--warmup", "1", "--reference", "torch", "--peak_flops", "1e12",
       "--config.data.augment_on=device"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1
  r = json.loads(lines[0])
  assert (r["method"], r["arch"], r["image_size"], r["batch"], r["queue_size"]) == \
      ("moco", "resnet6", 16, 16, 64)
  assert r["augment_on"] == "device"
  # The entry point ran with the flags the test gave it, nothing added.
  assert r["xla_flags"].split() == xla_flags.split()
  for key in ("compile_s", "step_ms_median", "images_per_s", "flops_per_image", "mfu",
              "compiled_temp_bytes", "state_bytes_per_device", "ema_update_ms"):
    assert r[key] > 0, key
  assert np.isfinite(r["final_loss"])
  assert r["images_per_s"] == pytest.approx(16 / (r["step_ms_median"] / 1e3), rel=1e-3)
  assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e12, rel=1e-3)
  assert "no torch in this test" in r["reference"]["skipped"]
  assert not any(k.startswith("ratio_vs") for k in r)


def test_cli_rejects_an_unknown_override_key():
  out = subprocess.run(
      [sys.executable, "-m", "jaxcontrast.bench", "--config", "configs/moco_imagenet2012.py:tiny",
       "--config.queue.sise=5"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert out.returncode == 2
  assert "queue.sise" in out.stderr and "Traceback" not in out.stderr


def test_input_loop_runs_the_real_pipeline(fashion_dir):
  """`--input`: the config's tf.data pipeline (prepared Fashion-MNIST here) feeding the
  compiled step; both rates reported."""
  from jaxcontrast.bench import step as step_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config("configs/moco_fashion_mnist.py:tiny")
  with c.unlocked():
    c.data.data_dir, c.data.shuffle_buffer, c.data.threadpool_size = fashion_dir, 64, 0
  r = step_lib.bench_loop(c, steps=2, warmup=1, devices=1)
  for key in ("input_ms_median", "input_images_per_s", "loop_ms_median", "loop_images_per_s",
              "loop_compile_s"):
    assert r[key] > 0, key
  assert r["dataset"] == "fashion_mnist"
  assert r["loop_images_per_s"] == pytest.approx(16 / (r["loop_ms_median"] / 1e3), rel=1e-2)


def test_cpu_profile_names_fusions_by_what_they_compute():
  """On CPU, kernels are XLA's compute-thread events named after HLO instructions; their kind
  comes from the optimized HLO (a fusion that calls a convolution is a convolution)."""
  hlo = "\n".join([
      "HloModule m, is_scheduled=true",
      "%fused_conv (p0: f32[1,4,4,1], p1: f32[3,3,1,1]) -> f32[1,4,4,1] {",
      "  %p0 = f32[1,4,4,1]{3,2,1,0} parameter(0)",
      "  ROOT %c = f32[1,4,4,1]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}",
      "}",
      "%fused_add (p0: f32[8]) -> f32[8] {",
      "  ROOT %a = f32[8]{0} add(%p0, %p0)",
      "}",
      "ENTRY %main (x: f32[1,4,4,1]) -> f32[1,4,4,1] {",
      "  %ynn_fusion.1 = f32[1,4,4,1]{3,2,1,0} fusion(%x, %k), kind=kCustom, calls=%fused_conv",
      "  %loop_fusion.2 = f32[8]{0} fusion(%y), kind=kLoop, calls=%fused_add",
      "  ROOT %t = (f32[8]{0}, s32[]) tuple(%loop_fusion.2, %z)",
      "}"])
  kinds = profile_lib.hlo_kinds(hlo)
  assert kinds["ynn_fusion.1"] == "convolution" and kinds["loop_fusion.2"] == "other"
  events = [
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "tf_XLAEigen/3"}},
      {"ph": "M", "name": "thread_name", "pid": 7, "tid": 2, "args": {"name": "__main__.py"}},
      {"ph": "X", "pid": 7, "tid": 1, "name": "ynn_fusion.1", "dur": 3000.0},
      {"ph": "X", "pid": 7, "tid": 1, "name": "loop_fusion.2", "dur": 1000.0},
      {"ph": "X", "pid": 7, "tid": 1, "name": "ThunkExecutor::Execute", "dur": 9000.0},
      {"ph": "X", "pid": 7, "tid": 2, "name": "ynn_fusion.1", "dur": 9000.0},   # not XLA's
  ]
  s = profile_lib.summarize_trace({"traceEvents": events}, steps=1, kinds=kinds)
  assert s["ms_per_step_by_kind"] == {"convolution": 3.0, "other": 1.0}
  assert s["device"].startswith("cpu")
