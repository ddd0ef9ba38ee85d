"""Damaged inputs give exit status 2 and exactly one ``error: <file>: <what is wrong>`` line on
stderr, nothing after it: truncated and byte-flipped orbax checkpoints (perplexity.py --model,
quantize --resume), a truncated safetensors file (both CLIs' --model) and a truncated GGUF."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from gptq_jax import checkpoint
from gptq_jax.integrity import CHECKSUMS
from tests.cli.conftest import FAST, ROOT, SCRIPT

PERPLEXITY = os.path.join(ROOT, "scripts", "perplexity.py")


def _largest_file(folder: str) -> str:
  files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns
           if n != "gptq_jax_checksums.json"]
  return max(files, key=os.path.getsize)


def _damage(path: str, how: str) -> None:
  if how == "truncated":
    os.truncate(path, os.path.getsize(path) // 2)
  else:  # one bit flipped in the middle
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      b = f.read(1)
      f.seek(-1, 1)
      f.write(bytes([b[0] ^ 0x10]))


def _assert_one_error_line(proc: subprocess.CompletedProcess, names: str) -> None:
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("error: ") and names in lines[-1], proc.stderr[-3000:]
  assert sum(l.startswith("error: ") for l in lines) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr


def _perplexity(model: str, tokens: str, env: dict) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, PERPLEXITY, "--model", model, "--tokens", tokens,
                         "--seqlen", "16", "--max-windows", "1"], env=env, capture_output=True,
                        text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def float_checkpoint(tiny_hf_dir, tmp_path_factory):
  from gptq_jax.models import load_llama

  cfg, params = load_llama(tiny_hf_dir)
  path = str(tmp_path_factory.mktemp("ckpt") / "float")
  checkpoint.save(path, params, model_config=cfg)
  return path


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_perplexity_on_a_damaged_orbax_checkpoint(float_checkpoint, how, cli_env, tmp_path):
  damaged = str(tmp_path / "ckpt")
  shutil.copytree(float_checkpoint, damaged)
  victim = _largest_file(os.path.join(damaged, "orbax"))
  _damage(victim, how)
  tokens = str(tmp_path / "tokens.npy")
  np.save(tokens, np.arange(3, 40, dtype=np.int32))
  proc = _perplexity(damaged, tokens, cli_env)
  _assert_one_error_line(proc, victim)
  assert ("truncated" if how == "truncated" else "bytes changed") in proc.stderr


def test_damaged_safetensors_and_gguf(tiny_hf_dir, cli_env, tmp_path):
  folder = str(tmp_path / "hf")
  shutil.copytree(tiny_hf_dir, folder)
  victim = os.path.join(folder, "model.safetensors")
  _damage(victim, "truncated")
  tokens = str(tmp_path / "tokens.npy")
  np.save(tokens, np.arange(3, 40, dtype=np.int32))
  _assert_one_error_line(_perplexity(folder, tokens, cli_env), f"{victim}: truncated")
  proc = subprocess.run([sys.executable, SCRIPT, "--model", folder, "--output",
                         str(tmp_path / "q"), *FAST], env=cli_env, capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  _assert_one_error_line(proc, f"{victim}: truncated")
  gguf = str(tmp_path / "model.gguf")
  with open(gguf, "wb") as f:  # a GGUF magic and version, then nothing
    f.write(b"GGUF\x03\x00\x00\x00")
  _assert_one_error_line(_perplexity(gguf, tokens, cli_env), gguf)


def test_resume_from_a_damaged_block(tiny_hf_dir, cli_env, tmp_path):
  out = str(tmp_path / "q")
  args = ["--model", tiny_hf_dir, "--output", out, *FAST]
  args.remove("--no-progress")  # the per-block lines tell when to kill
  proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=cli_env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:  # "[block 2/5]" is written after block 2's solve, before its save
    if line.startswith("[block 2/"):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert checkpoint.steps(os.path.join(out + ".partial", "blocks"))[:2] == [0, 1]
  for how in ("truncated", "flipped"):  # the same interrupted run, damaged two ways
    other = str(tmp_path / how)
    shutil.copytree(out + ".partial", other + ".partial")
    victim = _largest_file(os.path.join(other + ".partial", "blocks", "1"))
    _damage(victim, how)
    args[args.index("--output") + 1] = other
    resumed = subprocess.run([sys.executable, SCRIPT, *args, "--resume"], env=cli_env,
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    _assert_one_error_line(resumed, victim)
  # Killed between orbax's commit of block 1 and its checksum table (the window a lost process
  # fell in on two processes): not damage, an unfinished save; --resume quantizes it again.
  other = str(tmp_path / "untabled")
  shutil.copytree(out + ".partial", other + ".partial")
  os.remove(os.path.join(other + ".partial", "blocks", "1", CHECKSUMS))
  args[args.index("--output") + 1] = other
  resumed = subprocess.run([sys.executable, SCRIPT, *args, "--resume"], env=cli_env,
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "block 1's save was interrupted (no checksum table): it is quantized again" in \
      resumed.stderr and "resuming after block 0 (1/" in resumed.stderr, resumed.stderr[-3000:]
  checkpoint.load(other)  # every part's checksums verified
