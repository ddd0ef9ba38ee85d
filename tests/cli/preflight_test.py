"""The quantize CLI plans before it works (gptq_jax/cli/preflight.py): exercised on CPU with a fake
HBM per device (GPTQ_JAX_PLAN_HBM_GB), the refusal stops the run before any block, with one line
that names the setting to change; with room to spare the plan lets the run through."""

from __future__ import annotations

import os

from gptq_jax.cli.quantize import main
from tests.cli.conftest import FAST


def test_a_run_that_will_not_fit_stops_before_any_block(tiny_hf_dir, tmp_path, capsys,
                                                         monkeypatch):
  monkeypatch.setenv("GPTQ_JAX_PLAN_HBM_GB", "0.0002")  # 200 kB per device: nothing fits
  out = tmp_path / "q"
  assert main(["--model", tiny_hf_dir, "--output", str(out), *FAST]) == 2
  err = capsys.readouterr().err
  last = err.splitlines()[-1]
  assert last.startswith("error: the run needs ") and " per chip at '" in last, err
  assert " use " in last and ("--" in last or "chip" in last), last
  assert "Traceback" not in err and "layers.0" not in err  # no block was quantized
  assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")


def test_the_plan_lets_a_run_that_fits_through(tiny_hf_dir, tmp_path, monkeypatch):
  import argparse

  from gptq_jax.cli import preflight
  from gptq_jax.config import GPTQConfig
  from gptq_jax.models import load_hf_config

  monkeypatch.setenv("GPTQ_JAX_PLAN_HBM_GB", "16")
  said = []
  cfg = GPTQConfig(4, group_size=32, nsamples=4, seqlen=32)
  args = argparse.Namespace(batch_size=None, eval_text="none", eval_windows=16, stash_mb=None)
  plan = preflight.check_fits(args, cfg, load_hf_config(tiny_hf_dir), "float32", said.append)
  assert plan["fits"] and plan["hbm_bytes_per_chip"] == 16 * 10**9
  assert 0 < plan["hbm_peak_bytes_per_chip"] < 2**30 and said and said[0].startswith("plan: ")
  monkeypatch.delenv("GPTQ_JAX_PLAN_HBM_GB")
  assert preflight.check_fits(args, cfg, load_hf_config(tiny_hf_dir), "float32", said.append) \
      is None  # CPU without the override: no plan
