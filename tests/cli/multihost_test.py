"""Two quantize_llama.py processes under jax.distributed (loopback, CPU gloo collectives): each feeds
half of the calibration samples, the Hessians are summed over both, and the outputs equal one
process's (codes >= 99.9% identical; the Hessians differ only in float summation order), written
once (process 0 writes the HF folder and the report; the orbax save is collective)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

from gptq_jax import checkpoint
from tests.cli.conftest import FAST, LAYERS, ROOT, SCRIPT


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_cli_processes_match_one(tiny_hf_dir, cli_env, tmp_path):
  from gptq_jax import GPTQConfig, data
  from gptq_jax.models import load_llama, load_tokenizer
  from gptq_jax.pipeline import quantize

  out, hf, report = str(tmp_path / "q"), str(tmp_path / "hf"), str(tmp_path / "r.json")
  args = [sys.executable, SCRIPT, "--model", tiny_hf_dir, "--output", out, *FAST, "--save-hf",
          hf, "--report", report, "--coordinator", f"127.0.0.1:{_free_port()}",
          "--num-processes", "2"]
  procs = [subprocess.Popen(args + ["--process-id", str(pid)], env=cli_env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {pid} failed:\n{log[-3000:]}\nother:\n{logs[1 - pid][-3000:]}"
  assert "process 1/2: 2 of 4 calibration samples, 1 of 2 devices" in logs[1]
  assert "saved" in logs[0] and "saved" not in logs[1]  # process 0 speaks and writes
  assert sorted(os.listdir(tmp_path)) == ["hf", "q", "r.json", "r.png"]  # no .partial, .saving
  with open(report) as f:
    assert len(json.load(f)["layers"]) == 7 * LAYERS

  cfg = GPTQConfig(4, group_size=32, desc_act=True, act_group_aware=False, nsamples=4, seqlen=32)
  model_config, params = load_llama(tiny_hf_dir)
  batches = data.text_calib_batches(data.sotu_texts("calib"), load_tokenizer(tiny_hf_dir),
                                    nsamples=4, seqlen=32)
  want = quantize(params, batches, cfg, model_config=model_config, mesh=None, progress=False)
  got = checkpoint.load(out).params
  same = []
  for i in range(LAYERS):
    for group, projs in want[f"layers_{i}"].items():
      for proj, leaf in projs.items():
        if isinstance(leaf, dict) and "kernel" in leaf:
          a = np.asarray(got[f"layers_{i}"][group][proj]["kernel"].unpack().codes)
          same.append(np.mean(a == np.asarray(leaf["kernel"].unpack().codes)))
  assert len(same) == 7 * LAYERS and np.mean(same) >= 0.999, same
