"""Kept linear inputs (pipeline/stash.py): the same quantized model as recomputing every pass from
the block's input, for a fraction of the block work (counted against FLOPs worked out by hand)."""

import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.models import init_params
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.testing import TINY_CONFIGS
from gptq_jax.pipeline import quantize
from gptq_jax.pipeline.stats import PipelineStats

SEQ = 16


def _model(family):
  # Every projection 64 wide (q/k/v share one solve of 64 x 192): few solver shapes to compile.
  over = dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
              head_dim=32, num_hidden_layers=2)
  if family == "gemma3_text":  # 4 norms per block, q/k norms, sliding layers (one layer type:
    # one set of compiled passes)
    over.update(layer_types=["sliding_attention", "sliding_attention"], sliding_window=8)
  cfg = ModelConfig.from_hf_dict(dict(TINY_CONFIGS[family], **over, model_type=family))
  return cfg, init_params(cfg, 1)


def _run(cfg, params, ids, stash_bytes, mesh):
  qcfg = gj.GPTQConfig(4, group_size=32, desc_act=True, act_group_aware=False)
  stats = PipelineStats(sync=False)
  try:
    q = quantize(params, [ids[:8], ids[8:]], qcfg, model_config=cfg, stats=stats, mesh=mesh,
                 stash_bytes=stash_bytes, progress=False)
  finally:
    stats.close()
  return q, stats.summary()


def _per_token_flops(cfg):
  """Matmul FLOPs per token of each part of a block, from the config alone."""
  d, m, h, kv, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                     cfg.num_key_value_heads, cfg.head_dim)
  return {"qkv": 2 * d * (h + 2 * kv) * hd, "attn": 2 * 2 * h * hd * SEQ, "o": 2 * h * hd * d,
          "gate_up": 2 * 2 * d * m, "down": 2 * m * d}


def test_kept_inputs_give_the_recomputed_model():
  """Gemma 3 (4 norms per block, q/k norms, sliding attention): every subset kept
  against a budget that holds o's input only (the [down] pass and the propagation then rerun
  o, the residual, the norm and gate/up). The driver tests check the default path, on 8
  devices, against a by-hand reference."""
  cfg, params = _model("gemma3_text")
  ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (16, SEQ)).astype(np.int32)
  one = 16 * SEQ * cfg.hidden_size * 4  # one 64-wide input of every calibration token, float32
  partial, s0 = _run(cfg, params, ids, one, None)
  kept, s1 = _run(cfg, params, ids, None, None)
  assert s0["stash"]["kept_subsets"] == [1] and s0["stash"]["kept_bytes_per_device"] == one
  assert s0["stash"]["recomputed_subsets"] == [0, 2, 3]
  assert s1["stash"]["kept_subsets"] == [1, 2, 3]
  a, b = jax.tree.leaves(partial), jax.tree.leaves(kept)
  assert len(a) == len(b)
  for x, y in zip(a, b):  # codes, scales, zeros, g_idx and the float leaves: bit for bit
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  f = _per_token_flops(cfg)
  fwd = sum(f.values())
  # o's input kept: [q,k,v] no matmul, [o] qkv + attention, [gate,up] o, [down] o + gate/up;
  # the propagation (first block only: the last one feeds nothing) o, gate/up, down
  passes = f["qkv"] + f["attn"] + 2 * f["o"] + f["gate_up"]
  assert s0["forward_work_per_block"] == pytest.approx(
      (2 * passes + f["o"] + f["gate_up"] + f["down"]) / (2 * fwd))
  # all kept: [gate,up] o, [down] gate/up; the propagation o + down
  passes = f["qkv"] + f["attn"] + f["o"] + f["gate_up"]
  assert s1["forward_work_per_block"] == pytest.approx((2 * passes + f["o"] + f["down"])
                                                       / (2 * fwd))

