"""The run layer around the compiled step: the pretraining loop and what keeps a run safe.

  pretrain.py     the loop: data, step, metrics, kNN monitor, checkpoints, resume
  checkpoint.py   Orbax checkpoints of the whole state + data position + config (epath paths)
  metrics.py      metrics.jsonl and TensorBoard (process 0)
  preemption.py   save-and-exit on SIGTERM, SIGINT, SIGHUP (one step for all processes)
  progress.py     progress bar / log lines with images/s and ETA
"""
