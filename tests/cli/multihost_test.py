"""quantize_llama.py as two jax.distributed processes on loopback (CPU gloo collectives), each
feeding half of the calibration samples:

* on text calibration with ``--rotation hadamard``, ``--lm-head``, ``dynamic`` (8 and 2 bits, a
  float module) and refinement (data-parallel over both processes), the model equals the one a
  2-device mesh in one process gives with the same rows, code for code, every code within its bit
  width; on ``.npy`` token calibration with GPTAQ it equals one process on one device (the
  Hessians do not depend on how the samples are spread: core/hessian.py); written once;
* a process killed mid-run (SIGKILL) is an error for the other, within 60 s, with one line naming
  it; both restarted with ``--resume`` finish the same model (GPTAQ included: the float stream is
  carried through the saved blocks' float weights again).

Each launch checks several things: multi-process runs are slow on a loaded machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gptq_jax import PackedWeight, checkpoint
from gptq_jax.cli import peers
from tests.cli.conftest import ROOT, SCRIPT

LAYERS = 2
DYNAMIC = {r"+:.*\.q_proj": {"bits": 8}, r"+:.*\.up_proj": {"bits": 2}, r"-:.*\.o_proj": {}}
COMMON = ["--bits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "32"]
QUIET = ["--eval-text", "none", "--sample-prompt", ""]
LOST_BOUND = 60.0  # seconds for the survivor to stop once its peer is killed
LOST_AFTER = 8  # $GPTQ_JAX_LOST_AFTER_SECONDS of the lost-process launch (20 s by default: the
# survivor then idles 20 s of a suite worker's time)
TIMEOUT = 900


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_block_dir(tmp_path_factory) -> str:
  """The CLI tests' tiny Llama folder with 2 blocks (each launch costs two interpreters)."""
  from tests.cli.conftest import write_tiny_llama

  return write_tiny_llama(str(tmp_path_factory.mktemp("tiny2")), LAYERS)


class _Launch:
  """Two CLI processes; their merged output is collected line by line (``lines[pid]``)."""

  def __init__(self, args: list[str], env: dict):
    port = _free_port()
    self.lines: list[list[str]] = [[], []]
    self.procs = [subprocess.Popen(
        [sys.executable, SCRIPT, *args, "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(pid)], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    self.readers = [threading.Thread(target=self._read, args=(pid,), daemon=True)
                    for pid in range(2)]
    for r in self.readers:
      r.start()

  def _read(self, pid: int) -> None:
    for line in self.procs[pid].stdout:
      self.lines[pid].append(line.rstrip("\n"))

  def log(self, pid: int) -> str:
    return "\n".join(self.lines[pid])

  def finish(self, timeout: float = TIMEOUT) -> None:
    try:
      for p in self.procs:
        p.wait(timeout=timeout)
    finally:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
    for r in self.readers:
      r.join(timeout=10)
    for pid, p in enumerate(self.procs):
      assert p.returncode == 0, f"process {pid} failed:\n{self.log(pid)[-3000:]}"


def _codes(params) -> dict:
  out = {}
  for key, block in params.items():
    if key.startswith("layers_") or key == "lm_head":
      stack = [((key,), block)]
      while stack:
        path, node = stack.pop()
        if isinstance(node, PackedWeight):
          out[path] = node
        elif isinstance(node, dict):
          stack += [(path + (k,), v) for k, v in node.items()]
  return out


def _assert_codes_equal(got, want) -> None:
  g, w = _codes(got), _codes(want)
  assert sorted(g) == sorted(w)
  same = {p: float(np.mean(np.asarray(g[p].unpack().codes) == np.asarray(w[p].unpack().codes)))
          for p in w}
  assert min(same.values()) >= 0.999, same
  for p in w:
    assert g[p].bits == w[p].bits, p


def _reference(model_dir: str, calib, mesh=None, batch_size=1, dtype="float32", **cfg):
  """The model in this process: by default one device, one sample per micro-batch, float32 (with
  ``rotation``: the whole model rotated first, as the CLI's reads are; with ``dtype``: the float
  weights cast to it, as the CLI's ``--dtype`` casts what it reads)."""
  import jax
  import jax.numpy as jnp

  from gptq_jax import GPTQConfig
  from gptq_jax.models import load_llama
  from gptq_jax.pipeline import quantize
  from gptq_jax.pipeline.rotation import rotate_model

  model_config, params = load_llama(model_dir)
  if dtype != "float32":
    model_config = model_config.replace(dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype)
                          if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  if cfg.get("rotation"):
    model_config, params = rotate_model(model_config, params, cfg["rotation"])
  qcfg = GPTQConfig(4, group_size=32, nsamples=8, seqlen=32, **cfg)
  return quantize(params, calib, qcfg, model_config=model_config, mesh=mesh,
                  batch_size=batch_size, progress=False)


def test_two_processes_on_text_with_rotation_lm_head_dynamic_and_refinement_equal_one(
    two_block_dir, cli_env, tmp_path):
  """Text calibration, the residual stream rotated as it is read, the head quantized a slice of
  the vocabulary at a time, 8-bit, 2-bit and float modules, and refinement with learnt rounding
  run data-parallel over both processes (each trains on its own rows; gradients and held-out
  errors summed over both): the model one process gives with a 2-device mesh holding the same rows
  (process p's micro-batches of 2 rows on device p), code for code, every code within its bit
  width. Against one device refinement differs by its minibatches only:
  tests/pipeline/refine_mesh_test.py. One launch checks all of it: each costs two interpreters."""
  import jax

  from gptq_jax import data
  from gptq_jax.models import load_tokenizer

  out, hf, report = str(tmp_path / "q"), str(tmp_path / "hf"), str(tmp_path / "r.json")
  run = _Launch(["--model", two_block_dir, "--output", out, *COMMON, "--lm-head", "--dynamic",
                 json.dumps(DYNAMIC), "--rotation", "hadamard", "--dtype", "float32",
                 "--refine-steps", "16", "--refine-seqlen", "0", "--refine-rounding",
                 "--refine-lr", "0.005", "--refine-batch", "2", "--breakdown",
                 "--save-hf", hf, "--report", report, "--eval-windows", "2",
                 "--sample-prompt", "The union is", "--no-progress"], cli_env)
  run.finish()
  assert "perplexity on held-out text (2 windows" in run.log(0)
  assert "sample generation" in run.log(0) and "sample generation" not in run.log(1)
  assert "process 1/2: 4 of 8 calibration samples, 1 of 2 devices" in run.log(1)
  assert "saved" in run.log(0) and "saved" not in run.log(1)  # process 0 speaks and writes
  assert "breakdown (s):" in run.log(0)
  assert sorted(os.listdir(tmp_path)) == ["hf", "q", "r.json", "r.png"]  # no .partial
  calib = data.text_calib_batches(data.sotu_texts("calib"), load_tokenizer(two_block_dir),
                                  nsamples=8, seqlen=32)
  # the rows each process's device held, in the order a 2-device mesh lays 4-row batches out
  order = [0, 1, 4, 5, 2, 3, 6, 7]
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  want = _reference(two_block_dir, [calib[k] for k in order], mesh=mesh, batch_size=4,
                    lm_head=True, dynamic=DYNAMIC, rotation="hadamard", refine_steps=16,
                    refine_seqlen=0, refine_rounding=True)
  got = checkpoint.load(out).params
  assert got["lm_head"]["kernel"].bits == 4 and "o_proj" not in str(sorted(_codes(got)))
  assert sorted(_codes(got)) == sorted(_codes(want))
  for path, pw in _codes(got).items():
    codes = np.asarray(pw.unpack().codes)
    assert codes.max() <= 2**pw.bits - 1
    np.testing.assert_array_equal(pw.unpack().pack(pw.format).qweight, pw.qweight)
    ref = _codes(want)[path]
    assert pw.bits == ref.bits
    np.testing.assert_array_equal(codes, np.asarray(ref.unpack().codes), err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(pw.scales), np.asarray(ref.scales), err_msg=str(path))


def test_lost_process_then_resume_equals_one_process_with_gptaq_in_bfloat16(two_block_dir,
                                                                              cli_env, tmp_path):
  """Process 1 is killed once block 0 is saved: process 0 stops within
  ``LOST_BOUND`` with one line naming process 1; both restarted with --resume give the
  one-process GPTAQ model (``.npy`` token calibration, ``--dtype bfloat16`` weights and
  calibration forward)."""
  ids = np.random.default_rng(5).integers(0, 300, (8, 32)).astype(np.int32)
  npy = str(tmp_path / "ids.npy")
  np.save(npy, ids)
  out = str(tmp_path / "q")
  args = ["--model", two_block_dir, "--output", out, *COMMON, *QUIET, "--dataset", npy,
          "--gptaq", "--dtype", "bfloat16", "--no-progress"]
  env = dict(cli_env, **{peers.LOST_AFTER_ENV: str(LOST_AFTER)})
  run = _Launch(args, env)
  blocks = os.path.join(out + ".partial", "blocks")
  end = time.monotonic() + TIMEOUT
  while not (os.path.isdir(blocks) and checkpoint.steps(blocks)):  # block 0 saved
    assert time.monotonic() < end and run.procs[0].poll() is None, run.log(0)[-3000:]
    time.sleep(0.05)
  run.procs[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  run.procs[0].wait(timeout=LOST_BOUND + 30)
  took = time.monotonic() - killed
  run.readers[0].join(timeout=10)
  log = run.log(0)
  assert run.procs[0].returncode not in (0, None), log[-3000:]
  assert took <= LOST_BOUND, (took, log[-3000:])
  ours = [l for l in log.splitlines() if l.startswith("error: process 1 of 2 went away")]
  assert len(ours) == 1 and "--resume" in ours[0], log[-3000:]
  silent = float(ours[0].split("no sign of it for ")[1].split(" s")[0])  # the bound was the env's
  assert LOST_AFTER <= silent < peers.LOST_AFTER_SECONDS, ours[0]
  assert checkpoint.steps(blocks)[:1] == [0] and not os.path.exists(out)

  resumed = _Launch(args + ["--resume"], cli_env)
  resumed.finish()
  assert "resuming after block" in resumed.log(0)
  want = _reference(two_block_dir, ids, dtype="bfloat16", gptaq=True)
  _assert_codes_equal(checkpoint.load(out).params, want)
