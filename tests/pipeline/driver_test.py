"""The block-sequential driver against quantize_weight run by hand on the same block inputs."""

import flax.linen as nn
import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.models import block_forward, default_positions, embed
from gptq_jax.models.layers import Linear
from gptq_jax.pipeline import LLAMA_GROUPS, dense_block, quantize

HIGH = jax.lax.Precision.HIGHEST


def _linear_inputs(block, cfg, h, positions, mask):
  """Inputs of every Linear in one block run, by path (an interceptor written for the test)."""
  seen = {}

  def grab(next_fun, args, kwargs, context):
    if isinstance(context.module, Linear) and context.method_name == "__call__":
      seen[tuple(context.module.path)] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    out = block_forward(block, cfg, h, positions, mask)
  return seen, out


def _by_hand(cfg, params, batches, qcfg):
  """The reference driver, spelled out: numpy Hessians over unmasked tokens, one subset at a time."""
  hs = []
  for b in batches:
    ids, mask = np.asarray(b["input_ids"]), np.asarray(b["attention_mask"])
    hs.append((embed(params, cfg, ids), default_positions(mask, *ids.shape), mask))
  codes = {}
  groups = LLAMA_GROUPS if qcfg.true_sequential else (sum(LLAMA_GROUPS, ()),)
  for i in range(cfg.num_hidden_layers):
    block = params[f"layers_{i}"]
    for group in groups:
      X = {p: [] for p in group}
      for h, pos, mask in hs:
        seen, _ = _linear_inputs(block, cfg, h, pos, mask)
        for p in group:
          X[p].append(seen[p].reshape(-1, seen[p].shape[-1])[mask.reshape(-1) == 1])
      for p in group:
        x = np.concatenate(X[p]).astype(np.float64)
        H = (2.0 / len(x) * x.T @ x).astype(np.float32)
        k = block[p[0]][p[1]]["kernel"]
        qw = gj.quantize_weight(k, H, qcfg)
        codes[(i,) + p] = np.asarray(qw.codes)
        block = {**block, p[0]: {**block[p[0]], p[1]: {"kernel": qw.dequantize()}}}
    hs = [(block_forward(block, cfg, h, pos, mask), pos, mask) for h, pos, mask in hs]
  return codes


def _codes(qparams, i, path):
  return np.asarray(qparams[f"layers_{i}"][path[0]][path[1]]["kernel"].unpack().codes)


@pytest.mark.parametrize("qkw", [
    dict(group_size=32),
    dict(group_size=32, true_sequential=False, sym=False, format="gptq_v2"),
    dict(group_size=16, desc_act=True, static_groups=True, bits=3),
])
def test_pipeline_equals_quantize_weight_by_hand(tiny, qkw):
  cfg, params, batches = tiny
  qcfg = gj.GPTQConfig(qkw.pop("bits", 4), **qkw)
  report = []
  q = quantize(params, batches, qcfg, model_config=cfg, mesh=None, progress=False, report=report)
  want = _by_hand(cfg, params, batches, qcfg)
  for (i, *path), codes in want.items():
    got = _codes(q, i, tuple(path))
    assert np.mean(got == codes) >= 0.999, (i, path, np.mean(got == codes))
  assert [r["layer"] for r in report][:7] == [
      f"layers.0.{a}.{b}" for a, b in sum(LLAMA_GROUPS, ())]
  assert all(np.isfinite(r["loss"]) and r["damp"] == qcfg.damp_percent for r in report)
  # q/k/v and gate/up share a Hessian: each set is one solve (core.shared), codes as above.
  assert [r["solved_with"] for r in report][:7] == [3, 3, 3, 1, 2, 2, 1]
  packed = q["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(packed, gj.PackedWeight) and packed.format == qcfg.format
  assert q["lm_head"]["kernel"] is params["lm_head"]["kernel"]  # only the blocks are quantized


def test_gar_and_true_sequential_change_the_result(tiny):
  cfg, params, batches = tiny
  run = lambda **kw: quantize(params, batches, gj.GPTQConfig(4, group_size=16, **kw),
                              model_config=cfg, mesh=None, progress=False)
  base = _codes(run(), 1, ("mlp", "down_proj"))
  assert np.mean(base != _codes(run(act_group_aware=False), 1, ("mlp", "down_proj"))) > 0.01
  assert np.mean(base != _codes(run(true_sequential=False), 1, ("mlp", "down_proj"))) > 0.01


def test_resume_from_a_block_equals_a_full_run(tiny):
  cfg, params, batches = tiny
  qcfg = gj.GPTQConfig(4, group_size=32)
  done = []
  full = quantize(params, batches, qcfg, model_config=cfg, mesh=None, progress=False,
                  on_block_done=lambda i, blk, rec: done.append((i, blk, len(rec))))
  assert [(i, n) for i, _, n in done] == [(0, 7), (1, 7)]
  partial = {**params, "layers_0": done[0][1]}
  resumed = quantize(partial, batches, qcfg, model_config=cfg, mesh=None, progress=False,
                     start_block=1)
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_and_eight_devices_agree(tiny):
  """One device one sample at a time, and eight devices: the Hessians are the same bit for bit
  (core/hessian.py), so every code is (natural order: the case float-sum order used to move)."""
  cfg, params, batches = tiny
  qcfg = gj.GPTQConfig(4, group_size=32)
  one = quantize(params, batches, qcfg, model_config=cfg, mesh=None, batch_size=1,
                 progress=False)
  eight = quantize(params, batches, qcfg, model_config=cfg, mesh="auto", progress=False)
  assert jax.device_count() == 8
  same = [np.mean(_codes(one, i, p) == _codes(eight, i, p))
          for i in range(2) for p in sum(LLAMA_GROUPS, ())]
  assert min(same) == 1.0, same
  from gptq_jax.models import forward
  ids = np.asarray(batches[0]["input_ids"])
  logits = lambda q: np.asarray(forward(_dense(q), cfg, ids))
  np.testing.assert_allclose(logits(one), logits(eight), rtol=1e-3, atol=1e-4)


def _dense(qparams):
  return {k: dense_block(v) if k.startswith("layers_") else v for k, v in qparams.items()}


def test_bad_inputs(tiny):
  cfg, params, batches = tiny
  qcfg = gj.GPTQConfig(4, group_size=32)
  with pytest.raises(ValueError, match="cannot tell which model"):
    quantize(dict(params), batches, qcfg, mesh=None)  # a bare dict (init_params carry a config)
  with pytest.raises(ValueError, match=r"outside the model's vocabulary \[0, 256\)"):
    quantize(params, np.full((2, 8), 300), qcfg, model_config=cfg, mesh=None)
  with pytest.raises(ValueError, match="no calibration token"):
    quantize(params, {"input_ids": np.ones((2, 8), int), "attention_mask": np.zeros((2, 8))},
             qcfg, model_config=cfg, mesh=None)
  with pytest.raises(ValueError, match="integer token ids"):
    quantize(params, np.ones((2, 8), np.float32), qcfg, model_config=cfg, mesh=None)
  with pytest.raises(ValueError, match="must be a gptq_jax.GPTQConfig"):
    quantize(params, batches, {"bits": 4}, model_config=cfg)
