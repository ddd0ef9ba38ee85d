"""quantize_llama.py on a mixture of experts (in-process): a tiny Mixtral folder as transformers
writes it (block_sparse_moe.experts.{e}.w1/w2/w3), streamed block by block, with --moe-routing,
--fallback-threshold, --report (per-expert records, the plot) and --save-hf; an interrupted run
continued with --resume gives the uninterrupted run's arrays and records."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from gptq_jax import checkpoint
from gptq_jax.cli import report as report_lib
from gptq_jax.cli.quantize import main
from gptq_jax.interop import import_hf
from gptq_jax import resume
from tests.cli.conftest import FAST, tiny_tokenizer

pytest.importorskip("transformers")
NSAMPLES, SEQLEN = 4, 32


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> str:
  from gptq_jax.models.testing import tiny_hf_model

  tok = tiny_tokenizer()
  folder = str(tmp_path_factory.mktemp("mixtral"))
  tiny_hf_model(1, "mixtral", vocab_size=len(tok), intermediate_size=64).save_pretrained(folder)
  tok.save_pretrained(folder)
  return folder


def _args(model: str, out: str) -> list[str]:
  return ["--model", model, "--output", out, *FAST, "--moe-routing", "all",
          "--fallback-threshold", "0.3"]


class _Stop(Exception):
  pass


@pytest.fixture(scope="module")
def full(mixtral_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  out, hf, rep = str(root / "q"), str(root / "hf"), str(root / "report.json")
  assert main(_args(mixtral_dir, out) + ["--save-hf", hf, "--report", rep]) == 0
  return out, hf, rep


def test_streamed_moe_run_report_and_export(full):
  out, hf, rep = full
  ck = checkpoint.load(out)
  assert ck.model_config.model_type == "mixtral" and ck.quant_config.moe_routing == "all"
  assert ck.quant_config.fallback_threshold == 0.3
  with open(rep) as f:
    records = json.load(f)["layers"]
  experts = [r for r in records if "tokens" in r]
  assert len(experts) == 2 * 4 * 3  # 2 blocks x 4 experts x gate / up / down
  # --moe-routing all: every expert saw every calibration token, so none fell back
  assert all(r["tokens"] == NSAMPLES * SEQLEN and not r["fallback"] for r in experts)
  series, fallbacks = report_lib.loss_series(records)
  assert set(series) >= {"mlp.experts.gate_proj", "mlp.experts.down_proj", "self_attn.q_proj"}
  assert len(series["mlp.experts.up_proj"][1]) == 4 and not fallbacks
  assert os.path.isfile(rep[:-len(".json")] + ".png")
  model_config, params, _ = import_hf(hf)
  assert model_config == ck.model_config
  got = params["layers_1"]["mlp"]["experts"]["down_proj"]["kernel"]
  want = ck.params["layers_1"]["mlp"]["experts"]["down_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(got.qweight), np.asarray(want.qweight))


def test_interrupted_moe_run_resumes_to_the_same_result(full, mixtral_dir, tmp_path):
  out = str(tmp_path / "q")
  mp = pytest.MonkeyPatch()
  save = resume.ResumableRun.save_block

  def stop_after_first(self, i, block, records):
    save(self, i, block, records)
    raise _Stop

  mp.setattr(resume.ResumableRun, "save_block", stop_after_first)
  try:
    with pytest.raises(_Stop):
      main(_args(mixtral_dir, out))
  finally:
    mp.undo()
  assert main(_args(mixtral_dir, out) + ["--resume"]) == 0
  a, b = checkpoint.load(out), checkpoint.load(full[0])
  for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a.params),
                               jax.tree_util.tree_leaves_with_path(b.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  drop = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
  assert drop(a.meta["records"]) == drop(b.meta["records"])


def test_bad_moe_flags_fail_before_any_work(mixtral_dir, tmp_path, capsys):
  out = str(tmp_path / "q")
  assert main(["--model", mixtral_dir, "--output", out, *FAST, "--moe-routing", "top3"]) == 2
  assert "moe_routing" in capsys.readouterr().err
  assert main(["--model", mixtral_dir, "--output", out, *FAST, "--fallback-threshold", "2"]) == 2
  assert "fallback_threshold" in capsys.readouterr().err
  assert not os.path.exists(out)
