"""Mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral) against transformers' own models.

The tiny configs (gptq_jax.models.testing.TINY_CONFIGS): Qwen3-MoE with renormalized top-k and a
dense-only layer (mlp_only_layers=[1]); Qwen2-MoE with its gated shared expert and a sliding first
layer; Mixtral with a sliding window (16) on every layer, shorter than the sequences (40).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptq_jax
from gptq_jax.core.routed import expert_gram
from gptq_jax.core.weights import PackedWeight, stack_weights
from gptq_jax.eval import generate
from gptq_jax.kernels.grouped import grouped_matmul
from gptq_jax.models import ModelConfig, forward, load_model, save_hf_folder
from gptq_jax.models.safetensors_io import SafetensorsFile, save_safetensors
from gptq_jax.models.testing import (MOE_FAMILY_NAMES, assert_close, random_ids, tiny_pair,
                                     torch_logits)
from gptq_jax.pipeline import dense_block, rtn_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 40
ARCHS = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
         "mixtral": "MixtralForCausalLM"}
_forward = jax.jit(forward, static_argnums=1)


@pytest.fixture(scope="module")
def pairs():
  return {f: tiny_pair(f, seed=3) for f in MOE_FAMILY_NAMES}


_ids, _close = random_ids, assert_close


def test_config_fields(pairs):
  expect = {"qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                              norm_topk_prob=True, mlp_only_layers=(1,), qk_norm=True,
                              shared_expert_intermediate_size=0),
            "qwen2_moe": dict(num_experts=8, norm_topk_prob=False, qkv_bias=True, o_bias=False,
                              shared_expert_intermediate_size=48, shared_expert_gate=True),
            "mixtral": dict(num_experts=4, norm_topk_prob=True, moe_intermediate_size=None,
                            expert_intermediate_size=64)}
  for family, (_, cfg, params) in pairs.items():
    assert cfg.model_type == family and params.config == cfg
    for k, v in expect[family].items():
      assert getattr(cfg, k) == v, (family, k)
  kinds = {f: [(k.attention[:4], k.sparse) for k in pairs[f][1].layer_kinds] for f in pairs}
  assert kinds == {"qwen3_moe": [("full", True), ("full", False)],
                   "qwen2_moe": [("slid", True), ("full", True)],
                   "mixtral": [("slid", True), ("slid", True)]}
  mlp = pairs["qwen3_moe"][2]
  assert mlp["layers_0"]["mlp"]["experts"]["down_proj"]["kernel"].shape == (8, 32, 64)
  assert mlp["layers_1"]["mlp"]["down_proj"]["kernel"].shape == (96, 64)  # the dense-only layer


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_logits_match_transformers_with_padding(pairs, family):
  """float32 logits equal transformers' for a plain and a left-padded row (tiled grouped matmul
  on CPU; Qwen2-MoE also through jax.lax.ragged_dot)."""
  hf, cfg, params = pairs[family]
  ids = _ids(2, SEQ)
  mask = np.ones_like(ids)
  mask[1, :6] = 0
  ref = torch_logits(hf, ids, mask)
  impls = ("tiled", "ragged_dot") if family == "qwen2_moe" else ("tiled",)
  for impl in impls:
    ours = np.asarray(_forward(params, cfg.replace(moe_impl=impl), ids, mask))
    _close(ours[0], ref[0])
    _close(ours[1, 6:], ref[1, 6:])
  assert np.abs(ref).max() > 2.0


def test_differences_matter(pairs):
  """Each routing field changes the logits, so the test above can fail."""
  hf, cfg, params = pairs["qwen2_moe"]
  ids = _ids(1, SEQ)
  ref = torch_logits(hf, ids)
  for change in (dict(norm_topk_prob=True), dict(num_experts_per_tok=3),
                 dict(shared_expert_gate=False)):
    wrong = np.asarray(_forward(params, cfg.replace(**change), ids))
    assert np.abs(wrong - ref).max() > 1e-3 * np.abs(ref).max(), change


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_cached_generation_equals_transformers(pairs, family):
  """Greedy generation with the KV cache (past the window of 16) equals transformers'."""
  hf, cfg, params = pairs[family]
  prompt = _ids(1, 20, seed=1)[0]
  cached = generate(params, cfg, prompt, max_new_tokens=10)
  with torch.no_grad():
    ref = hf.generate(torch.tensor(prompt[None].astype(np.int64)), max_new_tokens=10,
                      do_sample=False, min_new_tokens=10)[0].numpy()
  np.testing.assert_array_equal(cached, ref)


def test_packed_experts_match_transformers_on_dequantized(pairs, tmp_path):
  """Qwen2-MoE, RTN 4-bit g16 (one grid per expert; router and shared-expert gate float): our
  packed forward and cached greedy generation == transformers on the dequantized weights, saved
  by save_hf_folder (one tensor per expert, as transformers writes them)."""
  hf, cfg, params = pairs["qwen2_moe"]
  qparams = rtn_model(params, gptq_jax.GPTQConfig(bits=4, group_size=16))
  mlp = qparams["layers_0"]["mlp"]
  assert isinstance(mlp["experts"]["gate_proj"]["kernel"], PackedWeight)
  assert mlp["experts"]["gate_proj"]["kernel"].qweight.shape == (8, 8, 32)
  assert isinstance(mlp["shared_expert"]["up_proj"]["kernel"], PackedWeight)
  for float_kernel in (mlp["gate"]["kernel"], mlp["shared_expert_gate"]["kernel"]):
    assert isinstance(float_kernel, jax.Array)
  deq = qparams.replace(**{f"layers_{i}": dense_block(qparams[f"layers_{i}"])
                          for i in range(cfg.num_hidden_layers)})
  save_hf_folder(tmp_path / "deq", None, deq)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "deq").eval()
  ids = _ids(2, SEQ, seed=2)
  ref = torch_logits(back, ids)
  _close(np.asarray(_forward(qparams, None, ids)), ref, rel=1e-5)
  assert np.abs(ref - torch_logits(hf, ids)).max() > 1e-3  # quantization did change them
  prompt = _ids(1, 20, seed=5)[0]
  with torch.no_grad():
    want = back.generate(torch.tensor(prompt[None].astype(np.int64)), max_new_tokens=6,
                         do_sample=False, min_new_tokens=6)[0].numpy()
  np.testing.assert_array_equal(generate(qparams, cfg, prompt, max_new_tokens=6), want)


def _fuse_experts(src, dst, family: str) -> None:
  """A copy of the folder `src` with each layer's experts fused as transformers 5's modules hold
  them (`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`)."""
  os.makedirs(dst)
  f = SafetensorsFile(os.path.join(src, "model.safetensors"))
  tensors = {n: np.asarray(f.get(n)) for n in f.keys()}
  names = {"gate": "w1", "up": "w3", "down": "w2"} if family == "mixtral" else {
      p: f"{p}_proj" for p in ("gate", "up", "down")}
  block = "block_sparse_moe" if family == "mixtral" else "mlp"
  for i in range(2):
    per = lambda p: sorted((n for n in tensors if n.startswith(  # noqa: E731
        f"model.layers.{i}.{block}.experts.") and n.endswith(f".{names[p]}.weight")),
        key=lambda n: int(n.split(".")[5]))
    if not per("gate"):
      continue
    stack = lambda p: np.stack([tensors.pop(n) for n in per(p)])  # noqa: E731
    gate, up, down = stack("gate"), stack("up"), stack("down")
    tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
    tensors[f"model.layers.{i}.mlp.experts.down_proj"] = down
    if family == "mixtral":  # transformers 5's module name for the router
      tensors[f"model.layers.{i}.mlp.gate.weight"] = tensors.pop(
          f"model.layers.{i}.block_sparse_moe.gate.weight")
  save_safetensors(os.path.join(dst, "model.safetensors"), tensors, metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as fh, open(os.path.join(dst, "config.json"), "w") as out:
    out.write(fh.read())


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_hf_folders_per_expert_and_fused(pairs, family, tmp_path):
  """transformers' save_pretrained (one tensor per expert; Mixtral's block_sparse_moe w1/w2/w3)
  and the same weights fused on disk both load to the same params; save_hf_folder writes what
  transformers loads back bit for bit, and the config round-trips."""
  hf, cfg, params = pairs[family]
  src = tmp_path / "src"
  hf.save_pretrained(src)
  names = SafetensorsFile(os.path.join(src, "model.safetensors")).keys()
  assert any(".experts.3." in n for n in names)
  fused = str(tmp_path / "fused")
  _fuse_experts(str(src), fused, family)
  leaves = lambda t: jax.tree_util.tree_leaves_with_path(t)  # noqa: E731
  for folder in (str(src), fused):
    cfg2, loaded = load_model(folder)
    assert cfg2 == cfg, folder
    for (path, a), (_, b) in zip(leaves(loaded), leaves(params), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  out = tmp_path / "out"
  save_hf_folder(out, None, params)
  config = json.load(open(out / "config.json"))
  assert config["architectures"] == [ARCHS[family]] and config["model_type"] == family
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  state = hf.state_dict()
  for name, value in back.state_dict().items():
    assert torch.equal(value, state[name]), name
  assert ModelConfig.from_hf_dict(back.config.to_dict()) == cfg
  assert ModelConfig.from_hf_dict(transformers.AutoConfig.for_model(
      **cfg.to_hf_dict()).to_dict()) == cfg


def test_grouped_matmul_and_expert_gram_against_numpy():
  """Rows sorted by expert (expert 2 gets none) times each expert's dense or packed weight; the
  per-expert X^T X over the rows of each expert, padding rows masked out."""
  rng = np.random.default_rng(0)
  sizes = np.array([5, 17, 0, 40, 1, 9], np.int32)
  rows, E, k, n = int(sizes.sum()), len(sizes), 32, 24
  x = rng.standard_normal((rows, k)).astype(np.float32)
  w = rng.standard_normal((E, k, n)).astype(np.float32)
  expert = np.repeat(np.arange(E), sizes)
  want = np.einsum("rk,rkn->rn", x, w[expert])
  for impl in ("tiled", "ragged_dot"):
    got = jax.jit(lambda x, w, g: grouped_matmul(x, w, g, impl=impl))(x, w, sizes)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  cfg = gptq_jax.GPTQConfig(bits=4, group_size=8)
  packed = stack_weights([gptq_jax.core.gptq.rtn_quantize(w[e], cfg).pack() for e in range(E)])
  deq = np.asarray(packed.dequantize())
  got = jax.jit(lambda x, w, g: grouped_matmul(x, w, g, impl="tiled"))(x, packed, sizes)
  np.testing.assert_allclose(np.asarray(got), np.einsum("rk,rkn->rn", x, deq[expert]),
                             rtol=1e-5, atol=1e-5)
  mask = (rng.random(rows) > 0.2).astype(np.float32)
  xtx, counts = expert_gram(jnp.asarray(x), jnp.asarray(sizes), jnp.asarray(mask), num_groups=E)
  for e in range(E):
    xe = x[expert == e] * mask[expert == e, None]
    np.testing.assert_allclose(np.asarray(xtx[e]), xe.T @ xe, rtol=1e-5, atol=1e-4)
    assert float(counts[e]) == mask[expert == e].sum()


@pytest.mark.parametrize("change,match", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(mlp_only_layers=(5,)), "mlp_only_layers"),
    (dict(router="sigmoid"), "router"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step"),
    (dict(moe_impl="megablox"), "moe_impl")])
def test_bad_moe_fields_are_refused(pairs, change, match):
  with pytest.raises(ValueError, match=match):
    pairs["qwen3_moe"][1].replace(**change)
