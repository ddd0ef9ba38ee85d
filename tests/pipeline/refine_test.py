"""Block-wise optax refinement: lower block error, valid packed weights, checkpoints, real model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax import checkpoint
from gptq_jax.models import block_forward, default_positions, embed
from gptq_jax.pipeline import LLAMA_GROUPS, LlamaAdapter, dense_block, quantize, rtn_model
from gptq_jax.pipeline.refine import refine_block

PATHS = sum(LLAMA_GROUPS, ())
_block_forward = jax.jit(block_forward, static_argnums=1)


def _block_mse(block, target_block, cfg, hs):
  """Mean squared output error per hidden element over unmasked tokens, float64 (by hand)."""
  sq, n = 0.0, 0
  for h, pos, mask in hs:
    d = np.asarray(_block_forward(block, cfg, h, pos, mask), np.float64) - np.asarray(
        _block_forward(target_block, cfg, h, pos, mask), np.float64)
    sq += float(np.sum(np.sum(d * d, -1) * mask))
    n += int(mask.sum())
  return sq / (n * cfg.hidden_size)


def _inputs(cfg, params, batches):
  out = []
  for b in batches:
    ids, mask = np.asarray(b["input_ids"]), np.asarray(b["attention_mask"])
    out.append((embed(params, cfg, ids), default_positions(mask, *ids.shape), mask))
  return out


def _run(tiny, batches=None, **kw):
  cfg, params, tiny_batches = tiny
  batches = tiny_batches if batches is None else batches
  report = []
  q = quantize(params, batches, gj.GPTQConfig(4, group_size=32, **kw), model_config=cfg,
               mesh=None, progress=False, report=report)
  return q, report


def _held(hs):
  """Refinement's held-out rows: one sample in eight, those whose index is 7 mod 8 (samples 7,
  15, 23, 31 of 32; sample 7 of 8): refine_rows.py."""
  out, k = [], 0
  for h, pos, mask in hs:
    idx = [r for r in range(h.shape[0]) if (k + r) % 8 == 7]
    k += h.shape[0]
    if idx:
      idx = np.asarray(idx)
      out.append((h[idx], pos[idx], mask[idx]))
  return out


def _calib32():
  """32 samples: refinement needs more than the 8 of ``tiny`` to generalise to held-out rows."""
  ids = np.random.default_rng(1).integers(0, 256, (32, 32)).astype(np.int32)
  return [{"input_ids": ids[a:a + 8], "attention_mask": np.ones((8, 32), np.int32)}
          for a in range(0, 32, 8)]


def test_refinement_lowers_each_blocks_heldout_error(tiny):
  cfg, params, _ = tiny
  batches = _calib32()
  q, report = _run(tiny, batches, refine_steps=25, refine_seqlen=0)  # whole windows
  plain, _ = _run(tiny, batches)
  hs = _inputs(cfg, params, batches)
  for i in range(cfg.num_hidden_layers):
    recs = [r for r in report if r["block"] == i]
    assert len(recs) == len(PATHS) and len({r["refine_block_mse_after"] for r in recs}) == 1
    r = recs[0]
    assert r["refine_kept"] and r["refine_block_mse_after"] < 0.99 * r["refine_block_mse_before"]
    assert 0 < r["refine_best_step"] <= 25
    assert all(np.isfinite(x["refine_layer_err_before"]) and np.isfinite(
        x["refine_layer_err_after"]) for x in recs)
    refined = dense_block(q[f"layers_{i}"])
    # The report's "after" is the refined block's error against the float block on the held-out
    # inputs; at block 0 (same inputs as plain GPTQ) "before" is plain GPTQ's.
    np.testing.assert_allclose(_block_mse(refined, params[f"layers_{i}"], cfg, _held(hs)),
                               r["refine_block_mse_after"], rtol=2e-3)
    if i == 0:
      gptq = dense_block(plain["layers_0"])
      np.testing.assert_allclose(_block_mse(gptq, params["layers_0"], cfg, _held(hs)),
                                 r["refine_block_mse_before"], rtol=2e-3)
      for a, b in PATHS:  # the scales moved (codes stay GPTQ's without refine_rounding)
        pw, p0 = q["layers_0"][a][b]["kernel"], plain["layers_0"][a][b]["kernel"]
        np.testing.assert_array_equal(pw.unpack().codes, p0.unpack().codes)
        assert np.mean(np.asarray(pw.scales) != np.asarray(p0.scales)) > 0.5, (a, b)
    hs = [(_block_forward(refined, cfg, h, pos, mask), pos, mask) for h, pos, mask in hs]


@pytest.mark.parametrize("kw", [dict(refine_lr=30.0, refine_seqlen=0),
                                dict(refine_lr=30.0, refine_rounding=True, refine_seqlen=8)])
def test_kept_step_never_has_a_higher_heldout_error_than_gptq(tiny, kw):
  """A learning rate that wrecks the scales: every check is worse than GPTQ, so each block keeps
  GPTQ's parameters (bit for bit) and reports its held-out error unchanged."""
  cfg, params, batches = tiny
  q, report = _run(tiny, refine_steps=8, **kw)
  plain, _ = _run(tiny)
  hs = _inputs(cfg, params, batches)
  for r in report:
    assert r["refine_block_mse_after"] <= r["refine_block_mse_before"]
  r0 = [r for r in report if r["block"] == 0][0]
  err = lambda blk: _block_mse(dense_block(blk), params["layers_0"], cfg, _held(hs))
  assert err(q["layers_0"]) <= err(plain["layers_0"]) * (1 + 1e-5)
  if not r0["refine_kept"]:
    for a, b in zip(jax.tree.leaves(q["layers_0"]), jax.tree.leaves(plain["layers_0"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kw", [
    dict(refine_rounding=True, desc_act=True),
    dict(refine_rounding=True, sym=False, format="gptq_v2", bits=3, group_size=16),
])
def test_refined_weights_are_valid_packed_weights_and_deterministic(tiny, kw):
  cfg, params, _ = tiny
  batches = _calib32()
  kw = {"group_size": 32, "bits": 4, **kw}
  # 60 steps: with 30, whether a block's refinement beats GPTQ on the held-out rows (errors of
  # 1e-6) turned on the compiler's rounding; with 60 both blocks are kept either way (measured)
  qcfg = gj.GPTQConfig(kw.pop("bits"), refine_steps=60, refine_lr=5e-3, **kw)
  plain = quantize(params, batches, qcfg.replace(refine_steps=0), model_config=cfg, mesh=None,
                   progress=False)
  report = []
  runs = [quantize(params, batches, qcfg, model_config=cfg, mesh=None, progress=False,
                   report=report if not k else None) for k in range(2)]
  q = runs[0]
  kept = sorted({r["block"] for r in report if r["refine_kept"]})
  assert kept, report  # some block's refined weights beat GPTQ's on the held-out rows
  first = kept[0]  # blocks before it kept GPTQ's weights: this one's GPTQ solve is the plain run's
  for i in range(cfg.num_hidden_layers):
    for a, b in PATHS:
      pw, p0 = q[f"layers_{i}"][a][b]["kernel"], plain[f"layers_{i}"][a][b]["kernel"]
      assert isinstance(pw, gj.PackedWeight)
      assert (pw.bits, pw.group_size, pw.format) == (p0.bits, p0.group_size, p0.format)
      assert pw.qweight.shape == p0.qweight.shape and pw.qweight.dtype == np.int32
      assert pw.scales.shape == p0.scales.shape
      codes = np.asarray(pw.unpack().codes)
      assert codes.max() <= 2**pw.bits - 1
      # Packing the unpacked weight reproduces the stored words: the codes are valid.
      np.testing.assert_array_equal(pw.unpack().pack(pw.format).qweight, pw.qweight)
      if i < first:  # not kept: GPTQ's weights bit for bit
        for leaf_a, leaf_b in zip(jax.tree.leaves(pw), jax.tree.leaves(p0)):
          np.testing.assert_array_equal(leaf_a, leaf_b)
      if i == first:  # same Hessians as the plain run: same g_idx and zero points; codes move
        np.testing.assert_array_equal(pw.g_idx, p0.g_idx)  # by one step at most, and some do
        np.testing.assert_array_equal(pw.zeros(), p0.zeros())
        moved = codes.astype(int) - np.asarray(p0.unpack().codes, int)
        assert np.abs(moved).max() <= 1 and np.mean(moved != 0) > 0.001, (a, b)
        assert np.mean(np.asarray(pw.scales) != np.asarray(p0.scales)) > 0.5, (a, b)
      for leaf_a, leaf_b in zip(jax.tree.leaves(pw), jax.tree.leaves(runs[1][f"layers_{i}"][a][
          b]["kernel"])):
        np.testing.assert_array_equal(leaf_a, leaf_b)  # deterministic with the seed


def test_rounding_offsets_move_gptqs_codes_by_at_most_one_step():
  from gptq_jax.pipeline.refine_loop import codes_of

  codes = jnp.array([[0.0, 3.0, 7.0], [5.0, 7.0, 0.0]])
  frozen = {"codes": codes}
  same = codes_of({"v": jnp.zeros_like(codes)}, frozen, True, 7, ste=False)
  np.testing.assert_array_equal(same, codes)  # v = 0: GPTQ's codes, its compensation intact
  up = codes_of({"v": jnp.full_like(codes, 0.6)}, frozen, True, 7, ste=False)
  np.testing.assert_array_equal(up, jnp.minimum(codes + 1, 7))
  down = codes_of({"v": jnp.full_like(codes, -0.9)}, frozen, True, 7, ste=False)
  np.testing.assert_array_equal(down, jnp.maximum(codes - 1, 0))


def test_refined_checkpoint_saves_and_reloads_bit_exact(tiny, tmp_path):
  cfg, params, batches = tiny
  qcfg = gj.GPTQConfig(4, group_size=32, refine_steps=20, refine_lr=5e-3)
  q = quantize(params, batches, qcfg, model_config=cfg, mesh=None, progress=False)
  checkpoint.save(str(tmp_path / "ck"), q, model_config=cfg, quant_config=qcfg)
  ck = checkpoint.load(str(tmp_path / "ck"))
  assert ck.quant_config == qcfg
  want = jax.tree_util.tree_leaves_with_path(q)
  got = dict(jax.tree_util.tree_leaves_with_path(ck.params))
  assert len(got) == len(want)
  for path, leaf in want:
    assert np.asarray(got[path]).dtype == np.asarray(leaf).dtype
    np.testing.assert_array_equal(got[path], leaf)
  k = ck.params["layers_1"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(k, gj.PackedWeight) and k.format == "gptq"


def test_refine_block_refuses_unquantized_blocks(tiny):
  cfg, params, batches = tiny
  hs = _inputs(cfg, params, batches[:1])
  h, pos, mask = hs[0]
  with pytest.raises(ValueError, match="not a PackedWeight"):
    refine_block(LlamaAdapter.for_config(cfg), params["layers_0"], params["layers_0"], h,
                 {"positions": pos, "attention_mask": mask}, mask,
                 gj.GPTQConfig(4, refine_steps=5))
  with pytest.raises(ValueError, match="refine_steps > 0"):
    refine_block(LlamaAdapter.for_config(cfg), params["layers_0"], params["layers_0"], h,
                 {"positions": pos, "attention_mask": mask}, mask, gj.GPTQConfig(4))


class _FirstBlocks(LlamaAdapter):
  """The Llama adapter restricted to the first ``k`` blocks (the rest stay float)."""

  def __init__(self, config, k):
    super().__init__(config)
    self.k = k

  def num_blocks(self, params):
    return self.k


@pytest.mark.slow
def test_smollm2_refinement_lowers_block_error_and_keeps_heldout_perplexity(
    smollm2, smollm2_tokenizer, sotu_eval_tokens):
  """4-bit g128 GPTQ (act-order) of SmolLM2-135M's first blocks, with and without refinement:
  every refined block's output error on the calibration tokens goes down (some blocks keep the
  refined codes), and perplexity on held-out SOTU windows (2016-2021; calibration uses 1990-2015
  only) stays within 1 % of GPTQ's. With 8 x 128 calibration tokens the held-out change is
  within noise and moves with how XLA compiled the run (measured 25.71 -> 25.76 and 25.54 ->
  25.56 with XLA's optimizations off, 25.77 -> 25.91 with them on): the test does not claim a
  held-out gain it cannot show."""
  from gptq_jax import data, eval as evaluation

  cfg, params = smollm2  # the session's model, shared with the other SmolLM2 tests
  tok = smollm2_tokenizer
  calib = data.text_calib_batches(data.sotu_texts("calib"), tok, nsamples=8, seqlen=128, seed=0,
                                  batch_size=8)
  heldout = sotu_eval_tokens
  adapter = _FirstBlocks(cfg, 4)
  qcfg = gj.GPTQConfig(4, group_size=128, desc_act=True, act_group_aware=False)
  ppl = {}
  for steps in (0, 30):
    report = []
    q = quantize(params, calib, qcfg.replace(refine_steps=steps, refine_lr=5e-3, refine_batch=2,
                                             refine_seqlen=0),
                 adapter=adapter, mesh=None, progress=False, report=report)
    dense = {k: dense_block(v) if k.startswith("layers_") else v for k, v in q.items()}
    ppl[steps] = evaluation.perplexity(dense, cfg, heldout, seqlen=256, max_windows=6,
                                       batch_size=6)
    if steps:
      assert all(r["refine_block_mse_after"] <= r["refine_block_mse_before"] for r in report)
      assert any(r["refine_kept"] for r in report)
  float_ppl = evaluation.perplexity(params, cfg, heldout, seqlen=256, max_windows=6, batch_size=6)
  assert float_ppl < min(ppl.values()), (float_ppl, ppl)
  assert abs(ppl[30] / ppl[0] - 1) < 1e-2, ppl
  assert ppl[30] != ppl[0], ppl  # refinement changed the model


def test_refining_a_second_block_of_the_same_type_compiles_nothing(tiny):
  """Every program refinement runs (the loop, the targets' block run, the measure, the final codes)
  is compiled for the first block of a layer type and reused by the next one."""
  cfg, params, batches = tiny
  qcfg = gj.GPTQConfig(4, group_size=32, refine_steps=2)
  q = rtn_model(params, qcfg, model_config=cfg)  # packed kernels, as GPTQ's (refinement's input)
  h, pos, mask = _inputs(cfg, params, batches[:1])[0]
  ctx = {"positions": pos, "attention_mask": mask}
  adapter = LlamaAdapter.for_config(cfg)
  compiles = []
  for i in range(2):
    if i == 1:
      jax.monitoring.register_event_duration_secs_listener(
          lambda event, secs, **kw: compiles.append(event)
          if event == "/jax/core/compile/backend_compile_duration" else None)
    try:
      refine_block(adapter, params[f"layers_{i}"], q[f"layers_{i}"], h, ctx, mask, qcfg, index=i)
    finally:
      jax.monitoring.clear_event_listeners()
  assert compiles == []
