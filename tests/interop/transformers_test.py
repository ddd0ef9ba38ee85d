"""Exports load in plain ``transformers.AutoModelForCausalLM.from_pretrained`` (GPTQModel installed,
run in .venv-gptqmodel), whatever the calibration source; the oracle helper fails under CI=true."""

import json
import os
import sys

import numpy as np
import pytest

from gptq_jax.interop import export_hf, import_hf
from gptq_jax.interop.calibration import describe_default
from gptq_jax.models import forward
from tests.interop import helpers
from tests.interop.helpers import tiny_tokenizer, transformers_logits


def test_exports_with_any_calibration_source_load_in_plain_transformers(tiny_llama, quantized,
                                                                        tmp_path):
  cfg, _, ids = tiny_llama
  qcfg, qparams = quantized(4, False)
  text = tmp_path / "calib.txt"
  text.write_text("some calibration text\n" * 20)
  npy = tmp_path / "calib.npy"
  np.save(npy, ids)
  sources = {"file": str(text), "npy": str(npy), "list": ["a first text", "a second one"],
             "default": None}
  tok = tiny_tokenizer(cfg.vocab_size)
  folders, ours = [], []
  for name, dataset in sources.items():
    folder = str(tmp_path / f"export_{name}")
    default = describe_default(qcfg.nsamples, qcfg.seqlen) if dataset is None else None
    export_hf(folder, qparams, cfg, qcfg.replace(dataset=dataset), tokenizer=tok,
              calibration_source=default)  # what quantize_llama.py passes for its default
    with open(os.path.join(folder, "config.json")) as f:
      raw = f.read()
    assert str(tmp_path) not in raw, f"{name}: a local path leaked into config.json"
    qc = json.loads(raw)["quantization_config"]
    assert qc["dataset"] == (dataset if name == "list" else None), name
    calib = qc["meta"]["calibration"]
    assert len(calib["sha256"]) == 64, name
    assert calib["source"].startswith({"file": "text file", "npy": "token array [8, 32]",
                                       "list": "list of 2 strings",
                                       "default": "bundled State of the Union"}[name]), calib
    model_config, params, read_cfg = import_hf(folder)
    assert read_cfg.replace(dataset=None) == qcfg
    folders.append(folder)
    ours.append(np.asarray(forward(params, model_config, ids[:2])))
  theirs = transformers_logits(folders, ids[:2], str(tmp_path))
  for name, a, b in zip(sources, ours, theirs):
    err, scale = np.abs(a - b).max(), np.abs(b).max()
    assert err <= 1e-4 * scale, f"{name}: max |diff| {err} (logits up to {scale})"


def test_oracle_helper_fails_under_ci_and_skips_locally(monkeypatch, tmp_path):
  """With the oracle's python pointing nowhere: CI=true fails the test, otherwise it skips."""
  nowhere = str(tmp_path / "no-venv" / "bin" / "python")
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match="CI=true.*GPTQModel venv absent"):
    helpers.run_oracle("logits", python=nowhere)
  with pytest.raises(pytest.fail.Exception, match="CI=true"):
    helpers.oracle_unavailable("the oracle timed out")
  monkeypatch.setenv("CI", "false")
  with pytest.raises(pytest.skip.Exception, match="GPTQModel venv absent"):
    helpers.run_oracle("logits", python=nowhere)
  monkeypatch.setenv("CI", "true")  # a broken venv: python runs, gptqmodel does not import
  with pytest.raises(pytest.fail.Exception, match="CI=true.*gptqmodel cannot be imported"):
    helpers.run_oracle("logits", "ids.npy", "out.npz", python=sys.executable)
  monkeypatch.delenv("CI")
  with pytest.raises(pytest.skip.Exception, match="timed out"):
    helpers.oracle_unavailable("the oracle timed out")
  monkeypatch.setenv("CI", "1")  # a missing test dependency (torch, transformers, nbformat...)
  with pytest.raises(pytest.fail.Exception, match="CI=true.*no_such_module cannot be imported"):
    helpers.importorskip("no_such_module")
  monkeypatch.delenv("CI")
  with pytest.raises(pytest.skip.Exception, match="no_such_module cannot be imported"):
    helpers.importorskip("no_such_module")
  assert helpers.importorskip("json").dumps(1) == "1"
