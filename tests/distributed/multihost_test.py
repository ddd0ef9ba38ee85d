"""Two processes under jax.distributed (loopback, CPU gloo collectives) against one process."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.xla_env import one_device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(nproc: int, out: str) -> list[subprocess.Popen]:
  port = str(_free_port())
  env = dict(os.environ, XLA_FLAGS=one_device_flags())  # the worker sets its device count
  return [subprocess.Popen([sys.executable, "-m", "tests.distributed.worker", str(pid), str(nproc),
                            port, out], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for pid in range(nproc)]


def _finish(procs: list[subprocess.Popen]) -> None:
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=900)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {pid}/{len(procs)} failed:\n{log[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two processes and, beside them, one (the reference does not depend on them: the three run
  at once, so the one process computes while the two wait on each other's collectives); each
  launch quantizes the dense model and the MoE one."""
  root = tmp_path_factory.mktemp("multihost")
  two, one = str(root / "two.npz"), str(root / "one.npz")
  procs = _start(2, two) + _start(1, one)
  try:
    _finish(procs[:2])
    _finish(procs[2:])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return two, one


def test_two_processes_match_one(runs):
  two, one = runs
  a, b = np.load(two), np.load(one)
  assert (int(a["processes"]), int(a["devices"])) == (2, 4)
  assert (int(b["processes"]), int(b["devices"])) == (1, 2)
  hs = [k for k in b.files if k.startswith("H:")]
  assert len(hs) == 14 and sorted(hs) == sorted(k for k in a.files if k.startswith("H:"))
  for k in hs:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6 * np.abs(b[k]).max(), err_msg=k)
  for k in [k for k in b.files if k.startswith("Q:")]:
    assert (a[k] == b[k]).mean() >= 0.999, k


def test_two_processes_match_one_for_a_mixture_of_experts(runs):
  """Per-expert Hessian sums over two processes (uneven shares): the same token counts per expert
  and the codes of one process."""
  two, one = (p[:-len(".npz")] + "_moe.npz" for p in runs)
  a, b = np.load(two), np.load(one)
  tokens = [k for k in b.files if k.startswith("T:")]
  assert len(tokens) == 3 * 8 and sum(int(b[k]) for k in tokens if k.endswith("up_proj")) > 0
  for k in tokens:
    assert int(a[k]) == int(b[k]), k
  experts = [k for k in b.files if k.startswith("Q:") and ".experts." in k]
  assert len(experts) == 3
  for k in [k for k in b.files if k.startswith("Q:")]:
    assert (a[k] == b[k]).mean() >= 0.999, k
