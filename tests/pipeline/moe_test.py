"""Mixture-of-experts quantization (pipeline/experts.py, capture.py): per-expert Hessians from the
routed tokens, experts solved together, the few-token fallback, calibration routing, and several
devices — on the tiny Qwen3-MoE (block 0 sparse with 8 experts, top-2; block 1 dense-only)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax.core.gptq import rtn_quantize
from gptq_jax.core.weights import PackedWeight
from gptq_jax.pipeline.adapter import ModelAdapter
from gptq_jax.pipeline.capture import HessianCapture
from gptq_jax.pipeline.experts import calibration_adapter
from gptq_jax.models.testing import tiny_pair

torch = pytest.importorskip("torch")

GATE_UP = (("mlp", "gate"), ("mlp", "experts", "gate_proj"), ("mlp", "experts", "up_proj"))
DEAD = 0  # expert 0 of block 0 never wins a top-2 slot in the `dead_expert` model


@pytest.fixture(scope="module")
def model():
  return tiny_pair("qwen3_moe", seed=3)


def _ids(n=8, seq=16, seed=0):
  return np.random.default_rng(seed).integers(3, 256, (n, seq)).astype(np.int32)


def _numpy_routing(x, router, k):
  """(top-k experts [T, k]) of the router's softmax, in NumPy."""
  logits = x @ router.T
  return np.argsort(-logits, axis=-1, kind="stable")[:, :k]


def test_expert_hessians_equal_numpy_from_the_routed_tokens(model):
  """H_e = 2/n_e X_e^T X_e over exactly the tokens routed to expert e (padding masked out), for
  the experts' gate/up input (the MLP input, taken from transformers with a hook) and for their
  down input (act(gate) * up of those tokens)."""
  hf, cfg, params = model
  ids = _ids(4, 16)
  mask = np.ones_like(ids)
  mask[1, -5:] = 0
  seen = {}
  hook = hf.model.layers[0].mlp.register_forward_hook(
      lambda m, inp, out: seen.setdefault("x", inp[0].detach().numpy()))
  with torch.no_grad():
    hf(torch.tensor(ids.astype(np.int64)), attention_mask=torch.tensor(mask))
  hook.remove()
  x = seen["x"].reshape(-1, cfg.hidden_size).astype(np.float64)
  moe = hf.model.layers[0].mlp
  top = _numpy_routing(x, moe.gate.weight.detach().numpy().astype(np.float64), 2)
  gate_up = moe.experts.gate_up_proj.detach().numpy().astype(np.float64)  # [E, 2I, H]
  m = cfg.expert_intermediate_size

  blk = ModelAdapter.for_config(cfg).block_adapter(0)
  hidden, ctx = blk.embed(params, ids, mask)
  caps = [HessianCapture(blk, g) for g in blk.sequential_groups[2:]]
  for cap in caps:
    cap.add(params["layers_0"], hidden, ctx, mask)
  H_in, n_in = caps[0].expert_hessians(("mlp", "experts", "up_proj"))
  H_down, n_down = caps[1].expert_hessians(("mlp", "experts", "down_proj"))
  assert caps[0].alias[("mlp", "experts", "up_proj")] == ("mlp", "experts", "gate_proj")
  real = mask.reshape(-1) == 1
  for e in range(cfg.num_experts):
    rows = real & (top == e).any(axis=1)
    xe = x[rows]
    a = xe @ gate_up[e, :m].T
    he = (a / (1 + np.exp(-a))) * (xe @ gate_up[e, m:].T)
    assert float(n_in[e]) == float(n_down[e]) == rows.sum(), e
    for ours, xs in ((H_in, xe), (H_down, he)):
      want = 2.0 / max(len(xs), 1) * xs.T @ xs
      np.testing.assert_allclose(np.asarray(ours[e]), want, rtol=2e-4, atol=2e-5 * np.abs(want).max())
  assert np.asarray(n_in).sum() == 2 * real.sum()


def test_calibration_routing_all_and_topk(model):
  """moe_routing: "all" sends every token to every expert; "topk:1" one expert per token; the
  block adapter of the propagation keeps the model's top-2."""
  _, cfg, params = model
  ids = _ids(2, 8)
  mask = np.ones_like(ids)
  blk = ModelAdapter.for_config(cfg).block_adapter(0)
  hidden, ctx = blk.embed(params, ids, mask)
  counts = {}
  for routing in ("all", "topk:1"):
    calib = calibration_adapter(blk, gj.GPTQConfig(4, moe_routing=routing))
    assert calib.config.num_experts_per_tok == (8 if routing == "all" else 1)
    cap = HessianCapture(calib, GATE_UP)
    cap.add(params["layers_0"], hidden, ctx, mask)
    counts[routing] = np.asarray(cap.expert_hessians(GATE_UP[1])[1])
  assert (counts["all"] == ids.size).all()
  assert counts["topk:1"].sum() == ids.size and (counts["topk:1"] < ids.size).all()
  assert calibration_adapter(blk, gj.GPTQConfig(4)) is blk and blk.config.num_experts_per_tok == 2


def _dead_expert(params):
  """The model with block 0's router changed so expert DEAD never makes a token's top 2: its
  logit is 0 while experts 1/2 and 3/4 have opposite logits (one of each pair is positive)."""
  router = np.array(params["layers_0"]["mlp"]["gate"]["kernel"])  # [hidden, E]
  router[:, DEAD] = 0.0
  router[:, 2], router[:, 4] = -router[:, 1], -router[:, 3]
  block = dict(params["layers_0"], mlp=dict(params["layers_0"]["mlp"], gate={"kernel": router}))
  return params.replace(layers_0=block)


@pytest.fixture(scope="module")
def runs(model):
  """GPTQ 4-bit g32 of the dead-expert model on one device and on the 8 test devices."""
  _, _, params = model
  params = _dead_expert(params)
  qcfg = gj.GPTQConfig(4, group_size=32)
  out = {}
  for mesh in (None, "auto"):
    records = []
    q = gj.quantize(params, _ids(), qcfg, mesh=mesh, progress=False, report=records)
    out[mesh] = (q, records)
  return params, qcfg, out


def test_several_devices_give_one_devices_codes(runs):
  """The per-expert Hessian sums are psum-ed over the data axis like the dense ones: 8 devices
  give the codes of one."""
  _, _, out = runs
  is_packed = lambda x: isinstance(x, PackedWeight)  # noqa: E731
  one, eight = (jax.tree_util.tree_leaves(out[m][0], is_leaf=is_packed) for m in (None, "auto"))
  assert len(one) == len(eight)
  for a, b in zip(one, eight):
    if is_packed(a):
      np.testing.assert_array_equal(np.asarray(a.qweight), np.asarray(b.qweight))
      np.testing.assert_array_equal(np.asarray(a.scales), np.asarray(b.scales))
  assert [r["tokens"] for r in out[None][1] if "tokens" in r] == [
      r["tokens"] for r in out["auto"][1] if "tokens" in r]


def test_an_expert_without_tokens_falls_back_and_is_reported(runs):
  """Expert 0 of block 0 got no token: round-to-nearest, reported with its count; the others
  got GPTQ; every token is counted twice (top-2); the router stays float."""
  params, qcfg, out = runs
  q, records = out[None]
  experts = [r for r in records if "tokens" in r]
  assert len(experts) == 3 * 8  # gate, up, down of 8 experts (block 1 is dense-only)
  for r in experts:
    assert r["block"] == 0 and r["layer"].startswith("layers.0.mlp.experts.")
    dead = r["expert"] == DEAD
    assert r["fallback"] is dead and r["few_tokens"] is dead and (r["tokens"] == 0) is dead
    assert np.isnan(r["loss"]) if dead else r["loss"] > 0
  gate_proj = [r for r in experts if r["layer"].endswith("gate_proj")]
  assert sum(r["tokens"] for r in gate_proj) == 2 * _ids().size
  assert any(r["layer"] == "layers.0.mlp.gate" and r.get("skipped") for r in records)
  mlp = q["layers_0"]["mlp"]
  np.testing.assert_array_equal(np.asarray(mlp["gate"]["kernel"]),
                                np.asarray(params["layers_0"]["mlp"]["gate"]["kernel"]))
  kernel = params["layers_0"]["mlp"]["experts"]["up_proj"]["kernel"][DEAD]
  want = rtn_quantize(kernel, qcfg).pack()
  got = mlp["experts"]["up_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(got.qweight[DEAD]), np.asarray(want.qweight))
  logits = gj.models.forward(q, None, _ids(1, 8, seed=3))
  assert np.isfinite(np.asarray(logits)).all()


def test_what_moe_quantization_refuses(model):
  _, cfg, params = model
  ids = _ids(2, 8)
  for kw, match in ((dict(gptaq=True), "gptaq"), (dict(refine_steps=2), "refine_steps"),
                    (dict(dynamic={r"+:.*experts\.3\.": {"bits": 8}}), "same rule")):
    with pytest.raises(ValueError, match=match):
      gj.quantize(params, ids, gj.GPTQConfig(4, **kw), mesh=None, progress=False)
  _, dense_cfg, dense = tiny_pair("llama")
  with pytest.raises(ValueError, match="mixture-of-experts"):
    gj.quantize(dense, ids, gj.GPTQConfig(4, moe_routing="all"), mesh=None, progress=False)
