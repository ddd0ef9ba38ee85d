"""Shared pieces of the interop tests: a tiny tokenizer, and the GPTQModel oracle subprocess."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPTQMODEL_PYTHON = os.path.join(ROOT, ".venv-gptqmodel", "bin", "python")
ORACLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gptqmodel_oracle.py")


def tiny_tokenizer(vocab_size: int = 256):
  """A word-level fast tokenizer over tokens "<0>".."<vocab-1>" (GPTQModel needs one to load)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

  tok = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", bos_token="<1>",
                                 eos_token="<2>")


def run_oracle(*args: str, timeout: float = 600) -> None:
  """Runs gptqmodel_oracle.py with .venv-gptqmodel's python; skips (saying why) if unavailable."""
  if not os.path.isfile(GPTQMODEL_PYTHON):
    pytest.skip(f"GPTQModel venv absent ({GPTQMODEL_PYTHON}): build it with "
                "scripts/setup_gptqmodel.sh to run the Hugging Face interop oracle tests")
  env = dict(os.environ, TORCH_COMPILE_DISABLE="1", GPTQMODEL_CPU_WORKERS="2",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", XLA_FLAGS="")
  try:
    proc = subprocess.run([GPTQMODEL_PYTHON, ORACLE, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    pytest.skip(f"the GPTQModel oracle did not finish within {timeout} s")
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout)[-2000:]
    if "ModuleNotFoundError" in tail or "ImportError" in tail:
      pytest.skip(f"gptqmodel cannot be imported in {GPTQMODEL_PYTHON}: {tail[-400:]}")
    raise AssertionError(f"the GPTQModel oracle failed (rc={proc.returncode}):\n{tail}")


def oracle_logits(folders: list[str], ids: np.ndarray, tmp: str) -> list[np.ndarray]:
  """GPTQModel's logits [batch, seq, vocab] for each folder (torch kernel, float32); skips with
  GPTQModel's own error if it cannot load one of them."""
  ids_path, out_path = os.path.join(tmp, "oracle_ids.npy"), os.path.join(tmp, "oracle_out.npz")
  np.save(ids_path, ids)
  run_oracle("logits", ids_path, out_path, *folders)
  out = np.load(out_path)
  logits = []
  for k, folder in enumerate(folders):
    status = str(out[f"status_{k}"])
    if not status.startswith("ok:"):
      pytest.skip(f"gptqmodel cannot load {folder}: {status}")
    assert "TorchLinear" in status, f"{folder} was not served by GPTQModel's torch kernel: {status}"
    logits.append(out[f"logits_{k}"])
  return logits
