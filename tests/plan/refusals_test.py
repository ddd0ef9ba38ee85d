"""What the planner cannot plan faithfully is refused in one line before any work: Gemma 4 (its
per-layer inputs and shared keys / values ride in the context from block to block), and what
mixture-of-experts quantization itself refuses (GPTAQ, refinement). The refusal comes before
libtpu is asked for the slice, so these run in the main venv."""

from __future__ import annotations

import json

import pytest

from gptq_jax.cli import plan as cli_plan
from gptq_jax.models.testing import GEMMA4_MOE, TINY_CONFIGS

GEMMA4 = dict(TINY_CONFIGS["gemma4_text"], model_type="gemma4_text",
              architectures=["Gemma4ForCausalLM"])
QWEN3_MOE = dict(TINY_CONFIGS["qwen3_moe"], model_type="qwen3_moe",
                 architectures=["Qwen3MoeForCausalLM"])


def _plan(tmp_path, capsys, config: dict, *flags: str) -> tuple[int, str]:
  path = tmp_path / "config.json"
  path.write_text(json.dumps(config))
  rc = cli_plan.main(["--model", str(path), "--topology", "v5e-8", "--figures", "", *flags])
  return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("config", [GEMMA4, dict(GEMMA4, **GEMMA4_MOE)], ids=["dense", "moe"])
def test_gemma4_is_refused_in_one_line(tmp_path, capsys, config):
  rc, err = _plan(tmp_path, capsys, config)
  assert rc == 2 and "\n" not in err
  assert err.startswith("error: scripts/plan.py does not plan gemma4_text (Gemma 4)")


@pytest.mark.parametrize("flags,what", [(("--gptaq",), "gptaq"),
                                        (("--refine-steps", "2"), "refine_steps")])
def test_what_moe_quantization_refuses_is_refused(tmp_path, capsys, flags, what):
  rc, err = _plan(tmp_path, capsys, QWEN3_MOE, *flags)
  assert rc == 2 and "\n" not in err
  assert err.startswith(f"error: {what} is not supported for mixture-of-experts models")
