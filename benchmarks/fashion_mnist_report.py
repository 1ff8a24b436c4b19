"""Results table and kNN curve of `benchmarks/fashion_mnist_results.sh` (see its header).

  python benchmarks/fashion_mnist_report.py --root workdirs/fashion_mnist_cpu \
      --png docs/fashion_mnist_moco_knn.png

Reads ROOT/<method>/linear_probe*.json (written by `jaxcontrast.eval.linear_probe`) and
ROOT/<method>/metrics.jsonl (written by the pretraining loop), prints a Markdown table (also
written to ROOT/results.md) and plots MoCo v2's kNN top-1 over its run (the `knn/top1` lines of
metrics.jsonl) to PNG when matplotlib is installed (`pip install -e ".[plot]"`). Missing runs
show as "-" so the table can be read while the benchmark is still running.
"""
from __future__ import annotations

import argparse
import json
import pathlib

METHODS = (("moco", "MoCo v2"), ("co2", "CO2"), ("xmoco", "XMoCo"), ("sce", "SCE"),
           ("fnc", "FNC"), ("sepp", "SePP"))


def _read_json(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def _metrics(workdir: pathlib.Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(result, key="top1") -> str:
  return "-" if not result or key not in result else f"{100 * result[key]:.2f}"


def _run_facts(workdir: pathlib.Path) -> dict:
  """Steps, epochs, images/s (mean of the logged rates) and the last kNN top-1 of one run."""
  lines = _metrics(workdir)
  rates = [m["images_per_s"] for m in lines if m.get("images_per_s")]
  knn = [m for m in lines if "knn/top1" in m]
  last = lines[-1] if lines else {}
  return {"steps": last.get("step"), "epoch": last.get("epoch"),
          "img_s": sum(rates) / len(rates) if rates else None,
          "knn": knn[-1]["knn/top1"] if knn else None}


def table(root: pathlib.Path) -> str:
  rows = ["| encoder | linear probe top-1 (%) | kNN top-1 (%) | steps | epochs | images/s |",
          "|---|---|---|---|---|---|"]
  baseline_dir = None
  for name, label in METHODS:
    workdir = root / name
    probe = _read_json(workdir / "linear_probe.json")
    facts = _run_facts(workdir)
    if baseline_dir is None and (workdir / "linear_probe_random.json").exists():
      baseline_dir = workdir
    fmt = lambda v, f: "-" if v is None else format(v, f)
    rows.append(f"| {label} | {_pct(probe)} | {fmt(facts['knn'] and 100 * facts['knn'], '.2f')} "
                f"| {fmt(facts['steps'], 'd')} | {fmt(facts['epoch'], '.1f')} "
                f"| {fmt(facts['img_s'], '.0f')} |")
  if baseline_dir is not None:
    rows.append(f"| same encoder, random initialisation | "
                f"{_pct(_read_json(baseline_dir / 'linear_probe_random.json'))} | - | 0 | 0 | - |")
    rows.append(f"| raw pixels | {_pct(_read_json(baseline_dir / 'linear_probe_pixels.json'))}"
                f" | - | - | - | - |")
  return "\n".join(rows) + "\n"


def plot_knn(workdir: pathlib.Path, png: pathlib.Path, *, title: str) -> bool:
  """kNN top-1 against epochs (steps if unknown); False when there is nothing to plot."""
  lines = [m for m in _metrics(workdir) if "knn/top1" in m]
  if not lines:
    return False
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed (pip install -e '.[plot]'): no PNG written")
    return False
  steps = [m["step"] for m in lines]
  top1 = [100 * m["knn/top1"] for m in lines]
  everything = _metrics(workdir)
  per_step = {m["step"]: m["epoch"] for m in everything if m.get("epoch") is not None}
  # Epochs of the kNN steps: logged on the same line, or interpolated from the logged epochs.
  if all(s in per_step for s in steps):
    x, xlabel = [per_step[s] for s in steps], "epoch"
  else:
    x, xlabel = steps, "step"
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  ax.plot(x, top1, marker="o")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("kNN top-1 (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(png)
  plt.close(fig)
  return True


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="workdirs/fashion_mnist_cpu")
  parser.add_argument("--png", default="docs/fashion_mnist_moco_knn.png")
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  text = table(root)
  (root / "results.md").write_text(text)
  print(text)
  if plot_knn(root / "moco", pathlib.Path(args.png),
              title="MoCo v2, Fashion-MNIST (kNN monitor, test split)"):
    print(f"kNN curve: {args.png}")


if __name__ == "__main__":
  main()
