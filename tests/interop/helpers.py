"""Shared pieces of the interop tests: a tiny tokenizer, and the GPTQModel oracle subprocess.

An oracle that cannot run (venv absent, gptqmodel not importable, a timeout, a crash) skips the
test locally, saying why, and fails it under ``CI=true``: in CI the oracle is part of the setup, so
its absence is a broken build, not a reason to pass (``oracle_unavailable`` decides).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# GPTQ_JAX_ORACLE_PYTHON points the tests at another interpreter (used by the helper's own test).
GPTQMODEL_PYTHON = os.environ.get("GPTQ_JAX_ORACLE_PYTHON",
                                  os.path.join(ROOT, ".venv-gptqmodel", "bin", "python"))
ORACLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gptqmodel_oracle.py")


def in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def oracle_unavailable(reason: str) -> None:
  """Skip (locally, with the reason printed) or fail (under CI=true) a test whose oracle cannot run."""
  if in_ci():
    pytest.fail(f"oracle unavailable under CI=true (a failure, not a skip): {reason}", pytrace=False)
  print(f"skipping: {reason}", file=sys.stderr)
  pytest.skip(reason)


def importorskip(module: str):
  """``pytest.importorskip`` that fails under ``CI=true`` (where every test dependency is part of
  the setup, so a missing one is a broken build); usable at module level too."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    reason = f"{module} cannot be imported ({e})"
    if in_ci():
      pytest.fail(f"a test dependency is missing under CI=true (a failure, not a skip): {reason}",
                  pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def tiny_tokenizer(vocab_size: int = 256):
  """A word-level fast tokenizer over tokens "<0>".."<vocab-1>" (GPTQModel needs one to load)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

  tok = Tokenizer(models.WordLevel(vocab={f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", bos_token="<1>",
                                 eos_token="<2>")


def run_oracle(*args: str, timeout: float = 600, python: str | None = None) -> None:
  """Runs gptqmodel_oracle.py with .venv-gptqmodel's python; see ``oracle_unavailable``."""
  python = python or GPTQMODEL_PYTHON
  if not os.path.isfile(python):
    oracle_unavailable(f"GPTQModel venv absent ({python}): build it with "
                       "scripts/setup_gptqmodel.sh to run the Hugging Face interop oracle tests")
  env = dict(os.environ, TORCH_COMPILE_DISABLE="1", GPTQMODEL_CPU_WORKERS="2",
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", XLA_FLAGS="")
  try:
    proc = subprocess.run([python, ORACLE, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    oracle_unavailable(f"the GPTQModel oracle did not finish within {timeout} s")
  except OSError as e:
    oracle_unavailable(f"the GPTQModel oracle could not start ({python}): {e}")
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout)[-2000:]
    if "ModuleNotFoundError" in tail or "ImportError" in tail:
      oracle_unavailable(f"gptqmodel cannot be imported in {python}: {tail[-400:]}")
    raise AssertionError(f"the GPTQModel oracle failed (rc={proc.returncode}):\n{tail}")


def _oracle_outputs(asks: dict[str, list[str]], ids: np.ndarray, tmp: str) -> dict[str, list]:
  """Each mode's folders (``asks``: mode -> folders), in one oracle process."""
  ids_path = os.path.join(tmp, "oracle_ids.npy")
  np.save(ids_path, ids)
  argv, outs = [], {}
  for mode, folders in asks.items():
    outs[mode] = os.path.join(tmp, f"{mode}_out.npz")
    argv += [*(["--"] if argv else []), mode, ids_path, outs[mode], *folders]
  run_oracle(*argv)
  got = {}
  for mode, folders in asks.items():
    out = np.load(outs[mode])
    got[mode] = [(str(out[f"status_{k}"]), out[f"logits_{k}"] if f"logits_{k}" in out else None)
                 for k in range(len(folders))]
  return got


_WHO = {"logits": "GPTQModel.load", "from_pretrained": "transformers"}


def _checked(mode: str, folders: list[str], outputs: list[tuple]) -> list[np.ndarray]:
  logits = []
  for folder, (status, out) in zip(folders, outputs, strict=True):
    assert status.startswith("ok:"), f"{_WHO[mode]} cannot load {folder}: {status}"
    assert "TorchLinear" in status, f"{folder} was not served by the torch kernel ({mode}): {status}"
    logits.append(out)
  return logits


def oracle_logits(folders: list[str], ids: np.ndarray, tmp: str) -> list[np.ndarray]:
  """GPTQModel's logits [batch, seq, vocab] for each folder (GPTQModel.load, torch kernel,
  float32); a folder GPTQModel cannot load fails the test with GPTQModel's own error."""
  return _checked("logits", folders, _oracle_outputs({"logits": folders}, ids, tmp)["logits"])


def transformers_logits(folders: list[str], ids: np.ndarray, tmp: str) -> list[np.ndarray]:
  """Plain ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` logits for each folder
  (GPTQModel installed, torch kernel, float32); a folder transformers refuses fails the test."""
  return _checked("from_pretrained", folders,
                  _oracle_outputs({"from_pretrained": folders}, ids, tmp)["from_pretrained"])


def both_logits(gptqmodel_folders: list[str], transformers_folders: list[str], ids: np.ndarray,
                tmp: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """``oracle_logits`` and ``transformers_logits`` in one oracle process (plain transformers
  first, so GPTQModel's own loader has not yet patched anything it uses)."""
  got = _oracle_outputs({"from_pretrained": transformers_folders, "logits": gptqmodel_folders},
                        ids, tmp)
  return (_checked("logits", gptqmodel_folders, got["logits"]),
          _checked("from_pretrained", transformers_folders, got["from_pretrained"]))
