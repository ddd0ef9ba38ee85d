"""Quantization, resume, report, packed forward, orbax save / load and Hugging Face GPTQ export /
import for every family (issue 11, item 4), against GPTQModel 7.7 and transformers.

GPTQModel runs as one subprocess per mode (tests/interop/gptqmodel_oracle.py, in .venv-gptqmodel):
one `quantize` call for its tiny Qwen3 and Gemma 3 folders, one `logits` call for every folder.

What GPTQModel 7.7 does per family (read from gptqmodel/models/definitions and from the folders it
writes for the tiny models here), which our folders have to agree with:
- Model types map to definitions: llama and mistral -> LlamaQModel ("100% llama clone"); qwen2 ->
  Qwen2QModel (Llama's module tree); qwen3 -> Qwen3QModel (Llama's tree plus self_attn.q_norm /
  k_norm marked as non-quantized modules); gemma3_text -> Gemma3QModel, which is Llama's tree
  unchanged: Gemma's pre_feedforward_layernorm / post_feedforward_layernorm and q_norm / k_norm are
  not listed at all. They still run (GPTQModel captures each linear's input with a hook on the
  linear inside the real decoder layer), so the MLP's Hessian is taken after
  pre_feedforward_layernorm, as ours is. Only q/k/v/o/gate/up/down are quantized, in the
  true-sequential subsets [q, k, v], [o], [gate, up], [down], for every family.
- Float tensors outside the quantized linears (embeddings, every norm including q_norm / k_norm)
  are saved in the dtype it loaded the model in: bfloat16 on CPU by default ("Auto dtype (CPU +
  Torch Fused)"), and config.json says "dtype": "bfloat16". The quantized linears' own tensors are
  scales float16, qweight / qzeros / g_idx int32, and Qwen2's q/k/v biases float16 (the bias lives
  in the quantized module) under their float names (`self_attn.q_proj.bias` beside `.qweight`).
- A tied model (tie_word_embeddings) gets no `lm_head.weight`.
- Qwen2's `use_sliding_window` + `max_window_layers` are kept and transformers 5 writes the
  resulting `layer_types` (layers >= max_window_layers slide) beside them.
- For gemma3_text, config.json's per-layer-type `rope_parameters` gains legacy top-level keys:
  "rope_theta": {"global": <full base>, "local": <sliding base>} and "rope_type": "default",
  beside the "full_attention" / "sliding_attention" entries, which stay authoritative.
- Its tokenizer wrapper fills a missing pad token and writes that pad_token_id into config.json.
  With no pad token in the tokenizer it guesses one by family: for Qwen2 "<|endoftext|>", which a
  tiny vocabulary lacks (id 256 = vocab size: building the model then fails with "Padding_idx must
  be within num_embeddings"); so the float folders here give their tokenizer a pad token ("<0>").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import gptq_jax as gj
from gptq_jax import checkpoint
from gptq_jax.core.weights import PackedWeight
from gptq_jax.interop import export_hf, import_hf
from gptq_jax.models import forward
from gptq_jax.models.safetensors_io import SafetensorsFile
from gptq_jax.models.testing import tiny_pair, torch_logits
from gptq_jax.resume import ResumableRun, fingerprint
from gptq_jax.pipeline.calib import normalize
from tests.interop.helpers import ROOT, both_logits, run_oracle, tiny_tokenizer

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# family -> (bits, desc_act, format): both orders, both formats and 3 bits are each covered.
# Qwen3 and Gemma 3 as GPTQModel quantizes them below, so their folders reuse our compiled forward.
CASES = {"llama": (4, False, "gptq"), "mistral": (3, True, "gptq_v2"),
         "qwen2": (4, False, "gptq_v2"), "qwen3": (4, True, "gptq"),
         "gemma3_text": (4, True, "gptq")}
BY_GPTQMODEL = ("qwen3", "gemma3_text")
FRESH_PROCESS = ("llama", "gemma3_text")  # the two most different families
PROJS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
         "mlp": ("gate_proj", "up_proj", "down_proj")}
GROUP = 32
EVAL_IDS = np.random.default_rng(99).integers(3, 256, (2, 32)).astype(np.int32)
# One compiled forward per (family config, packing): imported folders hit the quantized params'
# cache entry. (As NumPy: jit's cache also keys on whether arrays are committed to a device,
# which quantize's outputs are and import_hf's are not.)
_forward = jax.jit(forward, static_argnums=1)


def _logits(params, model_config) -> np.ndarray:
  return np.asarray(_forward(jax.tree.map(np.asarray, params), model_config, EVAL_IDS))


def _tokenizer(vocab_size: int):
  tok = tiny_tokenizer(vocab_size)
  tok.pad_token = "<0>"  # see the module docstring: GPTQModel would guess one outside the vocab
  return tok


def _tensor_names(folder: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  f = SafetensorsFile(os.path.join(folder, "model.safetensors"))
  return {n: (str(f.get(n).dtype), tuple(f.get(n).shape)) for n in f.keys()}


def _config_json(folder: str) -> dict:
  with open(os.path.join(folder, "config.json")) as f:
    return json.load(f)


class Run:
  """One family: the transformers model, our config / float params, and our GPTQ result."""

  def __init__(self, family: str, seed: int):
    self.family = family
    self.hf, self.cfg, self.params = tiny_pair(family, seed=seed)
    rng = np.random.default_rng(seed)
    self.ids = rng.integers(3, self.cfg.vocab_size, (8, 32)).astype(np.int32)
    bits, desc_act, fmt = CASES[family]
    self.qcfg = gj.GPTQConfig(bits, group_size=GROUP, desc_act=desc_act, act_group_aware=False,
                              format=fmt)
    self.records: list[dict] = []
    # The contract: params from our loaders carry their config; no model_config= here.
    self.qparams = gj.quantize(self.params, self.ids, self.qcfg, mesh=None, progress=False,
                               report=self.records)
    self.logits = _logits(self.qparams, self.cfg)  # packed kernels


@pytest.fixture(scope="module")
def runs():
  return {family: Run(family, seed) for seed, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def gptqmodel_folders(runs, tmp_path_factory):
  """GPTQModel's own 4-bit act-order v1 folders of the tiny Qwen3 and Gemma 3 (the same float
  weights as ours), from one oracle process: {family: folder}."""
  tmp = tmp_path_factory.mktemp("by_gptqmodel")
  srcs, outs = [], []
  for family in BY_GPTQMODEL:
    run = runs[family]
    src = str(tmp / f"{family}_float")
    run.hf.save_pretrained(src)
    _tokenizer(run.cfg.vocab_size).save_pretrained(src)
    srcs.append(src)
    outs.append(str(tmp / family))
  np.save(tmp / "calib.npy", runs["qwen3"].ids)
  run_oracle("quantize", ",".join(srcs), str(tmp / "calib.npy"), ",".join(outs), "4", str(GROUP),
             "1", "gptq", timeout=900)
  return dict(zip(BY_GPTQMODEL, outs))


def _expected_names(run: Run) -> set[str]:
  """Our export's tensor names, from transformers' own state dict of the same model: each
  quantized linear's weight becomes its four packed tensors, a tied lm_head is not written."""
  names = set()
  for name in run.hf.state_dict():
    if name == "lm_head.weight" and run.cfg.tie_word_embeddings:
      continue
    stem, _, leaf = name.rpartition(".")
    if leaf == "weight" and stem.rsplit(".", 1)[-1] in PROJS["self_attn"] + PROJS["mlp"]:
      names.update(f"{stem}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx"))
    else:
      names.add(name)
  return names


def test_every_family_exports_to_gptqmodel_with_our_logits(runs, gptqmodel_folders, tmp_path):
  """Our export of each family loads in transformers, through GPTQModel.load (torch kernel) and
  through plain AutoModelForCausalLM.from_pretrained, with logits equal to ours (packed kernels);
  GPTQModel's own Qwen3 / Gemma 3 folders, imported by us, run with logits equal to GPTQModel's.
  One oracle process per loader."""
  folders, ours = [], []
  for family, run in runs.items():
    folder = str(tmp_path / family)
    export_hf(folder, run.qparams, run.cfg, run.qcfg, tokenizer=_tokenizer(run.cfg.vocab_size))
    config = _config_json(folder)
    assert config["model_type"] == run.hf.config.model_type == family
    assert config["architectures"] == [type(run.hf).__name__]
    written = _tensor_names(folder)
    assert set(written) == _expected_names(run), family
    for name, (dtype, _) in written.items():
      floating = name.endswith((".weight", ".bias", ".scales"))
      assert dtype == ("float16" if floating else "int32"), name
    model_config, params, read_cfg = import_hf(folder)
    assert model_config == run.cfg, family
    assert (read_cfg.bits, read_cfg.desc_act, read_cfg.format) == CASES[family]
    folders.append(folder)
    ours.append(_logits(params, model_config))
  for family, folder in gptqmodel_folders.items():
    model_config, params, _ = import_hf(folder)
    folders.append(folder)
    ours.append(_logits(params, model_config))
  names = [*runs, *(f"{f} by GPTQModel" for f in gptqmodel_folders)]
  # GPTQModel.load on every folder; plain transformers.AutoModelForCausalLM.from_pretrained on
  # our five exports (one oracle process)
  by_gptqmodel, by_transformers = both_logits(folders, folders[:len(runs)], EVAL_IDS,
                                              str(tmp_path))
  checks = [("GPTQModel.load", names, ours, by_gptqmodel),
            ("from_pretrained", names[:len(runs)], ours[:len(runs)], by_transformers)]
  for loader, names, ours, theirs in checks:
    for name, a, b in zip(names, ours, theirs, strict=True):
      scale, err = np.abs(b).max(), np.abs(a - b).max()
      assert err <= 1e-4 * scale, f"{loader} {name}: max |diff| {err} (logits up to {scale})"
      assert scale > 1.0, name  # a real model's logits, not a degenerate one


def test_gptqmodel_qwen3_and_gemma3_import_with_identical_weights(runs, gptqmodel_folders,
                                                                  tmp_path):
  """GPTQModel's folders of the tiny Qwen3 and Gemma 3 import with dequantized weights identical
  to GPTQModel's own dequantization, name the same tensors as our export of the same model, and
  our model of them stays close to the float model."""
  for family, folder in gptqmodel_folders.items():
    run = runs[family]
    model_config, qparams, qcfg = import_hf(folder)
    assert (qcfg.bits, qcfg.group_size, qcfg.desc_act, qcfg.format) == (4, GROUP, True, "gptq")
    assert model_config.replace(pad_token_id=run.cfg.pad_token_id) == run.cfg, family
    theirs = np.load(os.path.join(folder, "dequantized.npz"))
    assert len(theirs.files) == 7 * run.cfg.num_hidden_layers
    for name in theirs.files:
      _, _, i, group, proj = name.split(".")
      w = qparams[f"layers_{i}"][group][proj]["kernel"]
      assert isinstance(w, PackedWeight), name
      np.testing.assert_array_equal(np.asarray(w.dequantize()), theirs[name], err_msg=name)
    # The same tensor names as our export of the same model (floats: bfloat16 there).
    ours = str(tmp_path / family)
    export_hf(ours, run.qparams, run.cfg, run.qcfg)
    assert set(_tensor_names(ours)) == set(_tensor_names(folder)), family
    logits = _logits(qparams, model_config)
    float_logits = torch_logits(run.hf, EVAL_IDS)
    assert np.abs(logits - float_logits).mean() < 0.25 * np.abs(float_logits).mean(), family


def test_report_lists_every_quantized_linear(runs, tmp_path):
  """The per-layer report lists every quantized linear of each family in true-sequential order
  with transformers' shapes, and nothing else (norms, biases and q/k norms stay float); the
  packed model stays close to the float one."""
  from gptq_jax.cli import report  # noqa: PLC0415

  for family, run in runs.items():
    hf_shapes = {name: tuple(t.shape) for name, t in run.hf.state_dict().items()}
    expected = [(f"layers.{i}.{g}.{p}", list(hf_shapes[f"model.layers.{i}.{g}.{p}.weight"][::-1]))
                for i in range(run.cfg.num_hidden_layers) for g, ps in PROJS.items() for p in ps]
    assert [(r["layer"], r["shape"]) for r in run.records] == expected, family
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and not r["fallback"]
               for r in run.records), family
    path = str(tmp_path / f"{family}.json")
    report.write(path, {"model": family, "layers": run.records})
    with open(path) as f:
      assert len(json.load(f)["layers"]) == len(expected)
    # Quantized, but still the same model: close to transformers' float logits, far from noise
    # (independent Gaussian logits of this size would be ~1.4 apart, relative to their mean).
    float_logits = torch_logits(run.hf, EVAL_IDS)
    bound = 0.25 if run.qcfg.bits == 4 else 0.5
    assert np.abs(run.logits - float_logits).mean() < bound * np.abs(float_logits).mean(), family


_LOAD_SCRIPT = """
import sys, jax, numpy as np
from gptq_jax import checkpoint
from gptq_jax.models import forward
ids = np.load(sys.argv[1]); out = {}
for k, path in enumerate(sys.argv[3:]):
  ck = checkpoint.load(path)
  run = jax.jit(forward, static_argnums=1)
  out[f"logits_{k}"] = np.asarray(run(ck.params, ck.model_config, ids))
  out[f"config_{k}"] = np.array(repr(ck.model_config.to_hf_dict()))
np.savez(sys.argv[2], **out)
"""


def test_orbax_checkpoints_reload_in_a_fresh_process(runs, tmp_path):
  """quantize -> checkpoint.save -> checkpoint.load -> identical logits and config: in this
  process for every family, in another Python process for Llama and Gemma 3 (one process)."""
  for family, run in runs.items():
    path = str(tmp_path / family)
    checkpoint.save(path, run.qparams, model_config=run.cfg, quant_config=run.qcfg)
    back = checkpoint.load(path)
    assert back.model_config == run.cfg and back.quant_config == run.qcfg, family
    np.testing.assert_array_equal(_logits(back.params, back.model_config), run.logits,
                                  err_msg=family)
  runs = {family: runs[family] for family in FRESH_PROCESS}
  paths = [str(tmp_path / family) for family in runs]
  ids = EVAL_IDS
  np.save(tmp_path / "ids.npy", ids)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(tmp_path / "ids.npy"),
                         str(tmp_path / "out.npz"), *paths], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = np.load(tmp_path / "out.npz")
  for k, (family, run) in enumerate(runs.items()):
    np.testing.assert_array_equal(out[f"logits_{k}"], run.logits, err_msg=family)
    assert str(out[f"config_{k}"]) == repr(run.cfg.to_hf_dict()), family


class _Stop(Exception):
  pass


def test_resume_after_the_first_block_equals_an_uninterrupted_run(runs, tmp_path):
  """Through the library pieces the CLI uses (resume.py): a run stopped once block 0 is
  saved, resumed from its partial state, gives the uninterrupted run's params and records (Llama
  and Gemma 3: the resume state is a family-independent params tree)."""
  for family in FRESH_PROCESS:
    run = runs[family]
    output = str(tmp_path / family)
    fp = fingerprint(run.params, run.cfg, run.qcfg, normalize(run.ids)[0])
    state = ResumableRun(output, fp, resume=False)

    def stop_after_first(i, block, records, state=state):
      state.save_block(i, block, records)
      raise _Stop

    with pytest.raises(_Stop):
      gj.quantize(run.params, run.ids, run.qcfg, mesh=None, progress=False,
                  on_block_done=stop_after_first)
    state = ResumableRun(output, fp, resume=True)
    done = state.completed()
    assert [i for i, _, _ in done] == [0], family
    records = [r for _, _, recs in done for r in recs]
    params = run.params.replace(**{f"layers_{i}": block for i, block, _ in done})
    resumed = gj.quantize(params, run.ids, run.qcfg, mesh=None, progress=False, report=records,
                          start_block=len(done), on_block_done=state.save_block)
    state.finish()
    assert not os.path.exists(output + ".partial")
    leaves = lambda t: jax.tree_util.tree_leaves_with_path(
        t, is_leaf=lambda x: isinstance(x, PackedWeight))
    full, back = leaves(run.qparams), leaves(resumed)
    assert [p for p, _ in full] == [p for p, _ in back], family
    for (path, a), (_, b) in zip(full, back):
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=f"{family} {jax.tree_util.keystr(path)}")
    assert [(r["layer"], r["loss"]) for r in records] == [
        (r["layer"], r["loss"]) for r in run.records], family
