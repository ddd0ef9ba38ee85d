"""Gemma 4 text quantized end to end: gptq_jax.quantize on 8 devices, the packed model against
transformers, the calibration stream against inference, HF GPTQ export (plain transformers loads
it) and import, orbax, resume, and the streamed CLI (scripts/quantize_llama.py, in-process).

The tiny model (`GEMMA4_UNIFORM`): a sliding layer, a full layer with k_eq_v (no v_proj) that
produces the keys / values the last (full) layer shares, per-layer inputs, every linear 64 x 64.
Quantized per block kind: [q, k, v] / [q, k] / [q], [o], [gate, up], [down],
[per_layer_input_gate], [per_layer_projection]; the per-layer input table and model projection
stay float. A block that shares keys / values is calibrated on the *quantized* producer's
(what it reads at inference), which the stream-versus-inference test checks. The same model with
every layer a mixture of 4 experts beside its dense MLP (`GEMMA4_MOE`) is quantized once more:
each expert from its own routed tokens, the router in float.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax import checkpoint
from gptq_jax.core.weights import PackedWeight
from gptq_jax.interop import export_hf, import_hf
from gptq_jax.models import CausalLM, forward
from gptq_jax.models.testing import GEMMA4_MOE, GEMMA4_UNIFORM, tiny_pair, torch_logits
from gptq_jax.pipeline import dense_block, dynamic
from tests.interop.helpers import tiny_tokenizer, transformers_logits

torch = pytest.importorskip("torch")

QCFG = gj.GPTQConfig(4, group_size=16, desc_act=True, act_group_aware=False)
CALIB = np.random.default_rng(7).integers(3, 256, (8, 24)).astype(np.int32)
EVAL_IDS = np.random.default_rng(8).integers(3, 256, (2, 24)).astype(np.int32)
_forward = jax.jit(forward, static_argnums=1)
ATTN = {0: ("q_proj", "k_proj", "v_proj"), 1: ("q_proj", "k_proj"), 2: ("q_proj",)}


def _logits(params, cfg, ids=EVAL_IDS) -> np.ndarray:
  return np.asarray(_forward(jax.tree.map(np.asarray, params), cfg, ids))


class Run:
  """The tiny model quantized once (mesh "auto": 8 CPU devices), with lm_head=True so the driver
  hands its last-block outputs to dynamic.quantize_lm_head, which a spy records (and leaves the
  float lm_head as it is)."""

  def __init__(self):
    self.hf, self.cfg, self.params = tiny_pair("gemma4_text", seed=3, **GEMMA4_UNIFORM)
    self.records: list[dict] = []
    seen = {}

    def spy(model_config, params, hidden, masks, cfg, records=None, *args, **kwargs):
      seen["hidden"] = np.concatenate([np.asarray(h) for h in hidden])
      return params

    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(dynamic, "quantize_lm_head", spy)
      self.qparams = gj.quantize(self.params, CALIB, QCFG.replace(lm_head=True), progress=False,
                                 report=self.records)
    self.stream_out = seen["hidden"]
    self.logits = _logits(self.qparams, self.cfg)


@pytest.fixture(scope="module")
def run():
  assert jax.device_count() == 8
  return Run()


def test_packed_forward_matches_transformers_on_dequantized(run):
  """Our packed forward == transformers' Gemma4ForCausalLM on the dequantized weights; the report
  lists each block kind's linears in true-sequential order; the per-layer input table and
  projection stay float."""
  expected = []
  for i in range(3):
    expected += [f"layers.{i}.self_attn.{p}" for p in ATTN[i]]
    expected += [f"layers.{i}.{p}" for p in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                              "mlp.down_proj", "per_layer_input_gate",
                                              "per_layer_projection")]
  assert [r["layer"] for r in run.records] == expected
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in run.records)
  for key in ("embed_tokens_per_layer", "per_layer_model_projection", "lm_head"):
    assert not any(isinstance(x, PackedWeight) for x in jax.tree.leaves(
        run.qparams[key], is_leaf=lambda x: isinstance(x, PackedWeight))), key
  state = {k: v.clone() for k, v in run.hf.state_dict().items()}
  for i in range(3):
    dense = dense_block(run.qparams[f"layers_{i}"])
    for path in (p.split(".")[2:] for p in expected if p.startswith(f"layers.{i}.")):
      node = dense
      for key in path:
        node = node[key]
      state[".".join(["model", "layers", str(i), *path, "weight"])] = torch.tensor(
          np.asarray(node["kernel"]).T.copy())
  deq = type(run.hf)(run.hf.config).eval()
  deq.load_state_dict(state)
  ref = torch_logits(deq, EVAL_IDS)
  assert np.abs(run.logits - ref).max() < 2e-6 * np.abs(ref).max()
  assert np.abs(ref - torch_logits(run.hf, EVAL_IDS)).max() > 1e-2  # the weights did change


def test_calibration_stream_is_the_quantized_models_own(run):
  """The driver's last-block outputs on the calibration samples equal the hidden states the
  quantized model computes at inference (each block's per-layer input, the shared layer reading
  the quantized producer's keys / values), and differ from the float model's."""

  def final_hidden(params):
    seen = {}

    def grab(next_fun, args, kwargs, context):
      if context.method_name == "logits" and isinstance(context.module, CausalLM):
        seen["h"] = np.asarray(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      forward(jax.tree.map(np.asarray, params), run.cfg, CALIB)
    return seen["h"]

  quantized, float_ = final_hidden(run.qparams), final_hidden(run.params)
  scale = np.abs(quantized).max()
  np.testing.assert_allclose(run.stream_out, quantized, atol=2e-5 * scale, rtol=0)
  assert np.abs(run.stream_out - float_).max() > 1e-2 * scale


def _assert_imported(params, qparams, extra: int = 0) -> None:
  """Every packed linear of `qparams` read back from a GPTQ folder bit for bit (scales are
  float16 on disk); `extra` packed kernels per block beyond the dense block's (stacked experts)."""
  for i in range(3):
    packed = jax.tree_util.tree_leaves_with_path(
        qparams[f"layers_{i}"], is_leaf=lambda x: isinstance(x, PackedWeight))
    assert sum(isinstance(w, PackedWeight) for _, w in packed) == len(ATTN[i]) + 6 + extra
    for path, w in (pw for pw in packed if isinstance(pw[1], PackedWeight)):
      back = params[f"layers_{i}"]
      for key in path:
        back = back[key.key]
      for field in ("qweight", "qzeros", "g_idx"):
        np.testing.assert_array_equal(getattr(back, field), getattr(w, field))
      np.testing.assert_array_equal(back.scales, np.asarray(w.scales).astype(np.float16))


def test_hf_export_loads_in_transformers_and_imports_bit_for_bit(run, tmp_path):
  folder = export_hf(tmp_path / "g4", run.qparams, run.cfg, QCFG, tokenizer=tiny_tokenizer(256))
  model_config, params, read_cfg = import_hf(folder)
  assert model_config == run.cfg and read_cfg == QCFG
  _assert_imported(params, run.qparams)
  ours = _logits(params, model_config)
  theirs = transformers_logits([folder], EVAL_IDS, str(tmp_path))[0]
  assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_orbax_checkpoint_reloads(run, tmp_path):
  checkpoint.save(str(tmp_path / "ck"), run.qparams, model_config=run.cfg, quant_config=QCFG)
  back = checkpoint.load(str(tmp_path / "ck"))
  assert back.model_config == run.cfg
  np.testing.assert_array_equal(_logits(back.params, back.model_config), run.logits)


def test_resume_after_the_producer_equals_an_uninterrupted_run(run):
  """Blocks 0-1 taken from the finished run, quantization resumed at block 2 (the block reading
  block 1's keys / values, recomputed from the quantized block 1): the same codes and losses."""
  partial = run.params.replace(layers_0=run.qparams["layers_0"], layers_1=run.qparams["layers_1"])
  records = [r for r in run.records if not r["layer"].startswith("layers.2.")]
  resumed = gj.quantize(partial, CALIB, QCFG, progress=False, report=records, start_block=2)
  a, b = (jax.tree.leaves(p["layers_2"]) for p in (resumed, run.qparams))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [(r["layer"], r["loss"]) for r in records] == [(r["layer"], r["loss"])
                                                        for r in run.records]


def test_rotation_and_gptaq_are_refused(run):
  from gptq_jax.pipeline.rotation import rotate_model  # noqa: PLC0415

  with pytest.raises(ValueError, match="'gemma4_text': its post-attention"):
    rotate_model(run.cfg, run.params, "hadamard")
  with pytest.raises(ValueError, match="share keys / values"):
    gj.quantize(run.params, CALIB, QCFG.replace(gptaq=True), progress=False)


def test_streamed_cli_quantizes_evaluates_resumes_and_exports(run, tmp_path, capsys):
  """scripts/quantize_llama.py (in-process main) on the model's HF folder with CALIB as its
  dataset: the checkpoint equals gptq_jax.quantize's result array for array, the float perplexity
  it streams through the blocks equals eval.perplexity's, and a run stopped after block 1's save
  resumes to the same arrays; its --save-hf folder imports to the checkpoint's weights."""
  from gptq_jax.cli.quantize import main  # noqa: PLC0415
  from gptq_jax.eval import perplexity  # noqa: PLC0415
  from gptq_jax.resume import ResumableRun  # noqa: PLC0415

  src = str(tmp_path / "src")
  run.hf.save_pretrained(src)
  tiny_tokenizer(256).save_pretrained(src)
  np.save(tmp_path / "calib.npy", CALIB)
  text = " ".join(f"<{t}>" for t in np.random.default_rng(9).integers(3, 256, 60))
  (tmp_path / "eval.txt").write_text(text)
  args = ["--model", src, "--bits", "4", "--group-size", "16", "--desc-act",
          "--no-act-group-aware", "--dataset", str(tmp_path / "calib.npy"), "--nsamples", "8",
          "--seqlen", "24", "--eval-text", str(tmp_path / "eval.txt"), "--eval-windows", "2",
          "--sample-prompt", "", "--no-progress"]
  out = str(tmp_path / "q")
  assert main(args + ["--output", out, "--save-hf", str(tmp_path / "hf"),
                      "--report", str(tmp_path / "r.json")]) == 0
  printed = capsys.readouterr().out
  ckpt = checkpoint.load(out)
  assert ckpt.model_config == run.cfg
  for (path, x), (_, y) in zip(*(jax.tree_util.tree_leaves_with_path(p) for p in
                                 (ckpt.params, run.qparams)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
  tokens = np.array([int(w[1:-1]) for w in text.split()], np.int32)
  want = perplexity(run.params, run.cfg, tokens, seqlen=24, max_windows=2)
  assert f"before {want:.3f}" in printed, printed
  _assert_imported(import_hf(str(tmp_path / "hf"))[1], ckpt.params)

  class Stop(Exception):
    pass

  save = ResumableRun.save_block

  def save_then_stop(self, i, block, records):
    save(self, i, block, records)
    if i == 1:
      raise Stop

  out2 = str(tmp_path / "q2")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ResumableRun, "save_block", save_then_stop)
    with pytest.raises(Stop):
      main(args + ["--output", out2])
  assert main(args + ["--output", out2, "--resume"]) == 0
  assert "resuming after block 1" in capsys.readouterr().err
  resumed = checkpoint.load(out2)
  for x, y in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(ckpt.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def moe_run():
  hf, cfg, params = tiny_pair("gemma4_text", seed=3, **GEMMA4_UNIFORM, **GEMMA4_MOE)
  records: list[dict] = []
  qparams = gj.quantize(params, CALIB, QCFG, progress=False, report=records)
  return hf, cfg, params, qparams, records


def _hf_state(hf, cfg, blocks) -> dict:
  """transformers' state dict with every block's linears (experts fused) from `blocks`."""
  state = {k: v.clone() for k, v in hf.state_dict().items()}
  put = lambda name, a: state.__setitem__(name, torch.tensor(np.ascontiguousarray(a)))  # noqa: E731
  for i, block in enumerate(blocks):
    for path, leaf in jax.tree_util.tree_leaves_with_path(block):
      keys = [k.key for k in path]
      if keys[-1] == "kernel" and keys[0] != "experts":
        put(".".join(["model", "layers", str(i), *keys[:-1], "weight"]), np.asarray(leaf).T)
    gate, up, down = (np.asarray(block["experts"][p]["kernel"])
                      for p in ("gate_proj", "up_proj", "down_proj"))
    put(f"model.layers.{i}.experts.gate_up_proj", np.concatenate([gate, up], 2).transpose(0, 2, 1))
    put(f"model.layers.{i}.experts.down_proj", down.transpose(0, 2, 1))
  return state


def test_moe_quantizes_each_expert_and_matches_transformers(moe_run, tmp_path):
  """Every expert quantized from the tokens routed to it (two per token: the counts add up), the
  router left float; the packed model equals transformers' on the dequantized weights. The GPTQ
  export warns that transformers cannot load quantized Gemma 4 experts and imports back bit for
  bit; with the experts left float (dynamic "-:" rule) plain transformers loads it, logits equal
  ours."""
  hf, cfg, params, qparams, records = moe_run
  for i in range(3):
    for proj in ("gate_proj", "up_proj", "down_proj"):
      rows = [r for r in records if r["layer"].startswith(f"layers.{i}.experts.")
              and r["layer"].endswith(proj)]
      assert [r["expert"] for r in rows] == [0, 1, 2, 3]
      assert sum(r["tokens"] for r in rows) == 2 * CALIB.size
    assert not isinstance(qparams[f"layers_{i}"]["router"]["proj"]["kernel"], PackedWeight)
    assert isinstance(qparams[f"layers_{i}"]["experts"]["down_proj"]["kernel"], PackedWeight)
  deq = type(hf)(hf.config).eval()
  deq.load_state_dict(_hf_state(hf, cfg, [dense_block(qparams[f"layers_{i}"]) for i in range(3)]))
  ref, ours = torch_logits(deq, EVAL_IDS), _logits(qparams, cfg)
  assert np.abs(ours - ref).max() < 2e-6 * np.abs(ref).max()
  assert np.abs(ref - torch_logits(hf, EVAL_IDS)).max() > 1e-2

  with pytest.warns(UserWarning, match="cannot: its Gemma 4 experts are fused parameters"):
    folder = export_hf(tmp_path / "q", qparams, cfg, QCFG)
  model_config, back, _ = import_hf(folder)
  assert model_config == cfg
  _assert_imported(back, qparams, extra=3)
  np.testing.assert_allclose(_logits(back, cfg), ours, rtol=0, atol=1e-2 * np.abs(ours).max())

  float_experts = QCFG.replace(dynamic={"-:.*experts.*": {}})
  mixed = qparams.replace(**{f"layers_{i}": dict(qparams[f"layers_{i}"],
                                                 experts=params[f"layers_{i}"]["experts"])
                             for i in range(3)})
  folder = export_hf(tmp_path / "f", mixed, cfg, float_experts, tokenizer=tiny_tokenizer(256))
  _, back, _ = import_hf(folder)
  theirs = transformers_logits([folder], EVAL_IDS, str(tmp_path))[0]
  assert np.abs(_logits(back, cfg) - theirs).max() <= 1e-4 * np.abs(theirs).max()
