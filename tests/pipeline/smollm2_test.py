"""The real model: GPTQ (4-bit, group 128, act-order) on SmolLM2-135M calibrated on a few bundled
State of the Union windows beats round-to-nearest on held-out addresses."""

import jax
import pytest

import gptq_jax as gj
from gptq_jax import data
from gptq_jax.eval import perplexity
from gptq_jax.pipeline import dense_block, quantize, rtn_model

CALIB_SEQLEN = 128  # 8 windows: 1024 calibration tokens (kept small: the suite's time budget)
EVAL_SEQLEN = 256


@pytest.mark.slow
def test_gptq_act_order_beats_rtn_on_held_out_text(smollm2, smollm2_tokenizer, sotu_eval_tokens):
  cfg, params = smollm2
  qcfg = gj.GPTQConfig(4, group_size=128, desc_act=True, act_group_aware=False)
  calib = data.text_calib_batches(data.sotu_texts("calib"), smollm2_tokenizer, nsamples=8,
                                  seqlen=CALIB_SEQLEN, batch_size=8)
  report = []
  qparams = quantize(params, calib, qcfg, model_config=cfg, mesh=None, progress=False,
                     report=report)
  assert len(report) == 7 * cfg.num_hidden_layers and not any(r["fallback"] for r in report)
  ppl = lambda p: perplexity(p, cfg, sotu_eval_tokens, seqlen=EVAL_SEQLEN, max_windows=6,
                             batch_size=6)
  rtn_params = rtn_model(params, qcfg, model_config=cfg)
  base, gptq, rtn = ppl(params), ppl(dense_block(qparams)), ppl(dense_block(rtn_params))
  print(f"SOTU 2016-2021 perplexity: float {base:.3f}, GPTQ {gptq:.3f}, RTN {rtn:.3f}")
  assert base < gptq < rtn, (base, gptq, rtn)
  packed = jax.tree.leaves(qparams["layers_0"], is_leaf=lambda x: isinstance(x, gj.PackedWeight))
  assert sum(isinstance(x, gj.PackedWeight) for x in packed) == 7
