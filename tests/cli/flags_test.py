"""Every flag of quantize_llama.py in a run that goes to the end (docs/combinations.md): one run
with every quality, data and run flag at once on the tests' 8 local devices, equal to the library
on the same mesh; one with ``--rotation``. (Several processes: multihost_test.py; ``--resume``
after a kill: quantize_test.py and multihost_test.py; ``--dtype bfloat16``: streaming_test.py.)"""

from __future__ import annotations

import gc
import json
import os

import jax
import numpy as np

import gptq_jax as gj
from gptq_jax import checkpoint
from gptq_jax.cli.quantize import main
from gptq_jax.models import load_llama
from gptq_jax.pipeline import quantize

DYNAMIC = {r"+:.*\.q_proj": {"bits": 8}, r"+:.*\.up_proj": {"bits": 2},
           r"-:.*layers\.1\.mlp\.down_proj": {}}


def _same(got, want) -> None:
  a, b = jax.tree_util.tree_leaves_with_path(got), dict(jax.tree_util.tree_leaves_with_path(want))
  assert len(a) == len(b)
  for path, leaf in a:
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(b[path]),
                                  err_msg=jax.tree_util.keystr(path))


def test_every_flag_at_once_runs_to_the_end(tiny_hf_dir, tmp_path, capsys):
  ids = np.random.default_rng(7).integers(0, 300, (8, 32)).astype(np.int32)
  npy, out = str(tmp_path / "ids.npy"), str(tmp_path / "q")
  np.save(npy, ids)
  report, hf = str(tmp_path / "r.json"), str(tmp_path / "hf")
  args = ["--model", tiny_hf_dir, "--output", out, "--bits", "3", "--group-size", "32",
          "--damp-percent", "0.05", "--no-act-group-aware", "--no-sym", "--no-true-sequential",
          "--static-groups", "--format", "gptq_v2", "--backend", "xla", "--mse", "2.4",
          "--mse-weight", "hessian", "--block-size", "32", "--refine-steps", "4",
          "--refine-lr", "0.01", "--refine-batch", "2", "--refine-seqlen", "16",
          "--refine-rounding", "--dynamic", json.dumps(DYNAMIC), "--lm-head", "--gptaq",
          "--gptaq-alpha", "0.3", "--dataset", npy, "--nsamples", "8", "--seqlen", "32",
          "--seed", "3", "--batch-size", "2", "--eval-windows", "2", "--sample-prompt",
          "The union is", "--dtype", "float32", "--stash-mb", "0", "--spread-solves", "off",
          "--breakdown", "--no-compile-cache", "--save-hf", hf, "--report", report,
          "--no-progress"]
  assert main(args) == 0, capsys.readouterr().err
  printed = capsys.readouterr()
  assert "breakdown (s):" in printed.out and "sample generation" in printed.out
  from gptq_jax.models import decode
  assert decode._LAST == []  # neither sample's model outlives it (the float one held 1.2 GB of
  # Gemma 3 270M's run through every block before)
  assert gc.get_freeze_count() == 0  # what the run froze (stream.freeze_heap) is thawed
  assert "perplexity on held-out text (2 windows of 32 tokens)" in printed.out
  ck = checkpoint.load(out)
  cfg = gj.GPTQConfig(3, group_size=32, damp_percent=0.05, act_group_aware=False, sym=False,
                      true_sequential=False, static_groups=True, format="gptq_v2", mse=2.4,
                      mse_weight="hessian", block_size=32, refine_steps=4, refine_lr=0.01,
                      refine_batch=2, refine_seqlen=16, refine_rounding=True, dynamic=DYNAMIC,
                      lm_head=True, gptaq=True, gptaq_alpha=0.3, nsamples=8, seqlen=32, seed=3,
                      dataset=os.path.abspath(npy))
  assert ck.quant_config.replace(backend=None) == cfg.replace(dataset=None)
  model_config, params = load_llama(tiny_hf_dir)
  want = quantize(params, ids, cfg, model_config=model_config, mesh="auto", batch_size=2,
                  progress=False)
  assert jax.device_count() == 8
  _same(ck.params, want)
  assert ck.params["lm_head"]["kernel"].bits == 3
  assert ck.params["layers_0"]["self_attn"]["q_proj"]["kernel"].bits == 8
  assert not isinstance(ck.params["layers_1"]["mlp"]["down_proj"]["kernel"], gj.PackedWeight)
  with open(report) as f:
    layers = json.load(f)["layers"]
  assert any("refine_block_mse_after" in r for r in layers)
  with open(os.path.join(hf, "config.json")) as f:
    assert json.load(f)["quantization_config"]["bits"] == 3


def test_rotation_runs_to_the_end(tiny_hf_dir, tmp_path, capsys):
  """``--rotation hadamard`` (with ``--resume`` on a fresh output: it starts from block 0) equals
  rotate_model + quantize on the same mesh."""
  from gptq_jax import data
  from gptq_jax.models import load_tokenizer
  from gptq_jax.pipeline.rotation import rotate_model

  out = str(tmp_path / "q")
  args = ["--model", tiny_hf_dir, "--output", out, "--bits", "4", "--group-size", "32",
          "--nsamples", "4", "--seqlen", "32", "--desc-act", "--rotation", "hadamard",
          "--resume", "--eval-text", "none", "--sample-prompt", "", "--no-progress"]
  assert main(args) == 0, capsys.readouterr().err
  model_config, params = load_llama(tiny_hf_dir)
  model_config, params = rotate_model(model_config, params, "hadamard")
  calib = data.text_calib_batches(data.sotu_texts("calib"), load_tokenizer(tiny_hf_dir),
                                  nsamples=4, seqlen=32)
  cfg = gj.GPTQConfig(4, group_size=32, desc_act=True, act_group_aware=False, nsamples=4,
                      seqlen=32, rotation="hadamard")
  want = quantize(params, calib, cfg, model_config=model_config, mesh="auto", progress=False)
  got = checkpoint.load(out).params
  for i in range(model_config.num_hidden_layers):
    _same(got[f"layers_{i}"], want[f"layers_{i}"])
