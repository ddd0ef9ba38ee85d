"""The driver's GPTAQ path against GPTAQ run by hand on the same two streams (float and quantized):
every linear solved by the NumPy port of the published update (tests/core/reference_gptaq.py)."""

import numpy as np

import gptq_jax as gj
from gptq_jax.models import block_forward, default_positions, embed
from gptq_jax.pipeline import LLAMA_GROUPS, quantize
from tests.core import reference_gptaq as ref
from tests.pipeline.driver_test import _codes, _linear_inputs


def _by_hand(cfg, params, batches, qcfg, driven):
  """Float and quantized streams kept side by side; each subset's H and dXXT in NumPy, each
  linear quantized by the NumPy GPTAQ port (GAR on: the config's default without act-order).
  The quantized stream runs on ``driven``'s weights (the driver's result), so every linear's
  expectation comes from the same inputs as the driver's solve: rare code differences between
  the port and the solver do not pile up over the layers."""
  hs, fs = [], []
  for b in batches:
    ids, mask = np.asarray(b["input_ids"]), np.asarray(b["attention_mask"])
    h = embed(params, cfg, ids)
    hs.append((h, default_positions(mask, *ids.shape), mask))
    fs.append(h)
  codes = {}
  for i in range(cfg.num_hidden_layers):
    fblock = block = params[f"layers_{i}"]
    for group in LLAMA_GROUPS:
      X = {p: [] for p in group}
      XF = {p: [] for p in group}
      for (h, pos, mask), hf in zip(hs, fs):
        seen, _ = _linear_inputs(block, cfg, h, pos, mask)
        fseen, _ = _linear_inputs(fblock, cfg, hf, pos, mask)
        keep = mask.reshape(-1) == 1
        for p in group:
          X[p].append(seen[p].reshape(-1, seen[p].shape[-1])[keep])
          XF[p].append(fseen[p].reshape(-1, fseen[p].shape[-1])[keep])
      for p in group:
        x, xf = (np.concatenate(a[p]).astype(np.float64) for a in (X, XF))
        H = (2.0 / len(x) * x.T @ x).astype(np.float32)
        D = (2.0 / len(x) * (xf - x).T @ x).astype(np.float32)
        kernel = np.asarray(block[p[0]][p[1]]["kernel"], np.float32)
        c, *_ = ref.fasterquant_gptaq(
            kernel, H, D, bits=qcfg.bits, alpha=qcfg.gptaq_alpha, group_size=qcfg.group_size,
            percdamp=qcfg.damp_percent, gar=True)
        codes[(i,) + p] = c.T  # [in, out], as the packed weight's codes
        ours = driven[f"layers_{i}"][p[0]][p[1]]["kernel"].dequantize()
        block = {**block, p[0]: {**block[p[0]], p[1]: {"kernel": ours}}}
    hs = [(block_forward(block, cfg, h, pos, mask), pos, mask) for h, pos, mask in hs]
    fs = [block_forward(fblock, cfg, hf, pos, mask) for hf, (_, pos, mask) in zip(fs, hs)]
  return codes


def test_driver_gptaq_equals_by_hand_and_differs_from_gptq(tiny):
  cfg, params, batches = tiny
  qcfg = gj.GPTQConfig(3, group_size=32, gptaq=True)
  report = []
  q = quantize(params, batches, qcfg, model_config=cfg, mesh=None, progress=False, report=report)
  for (i, *path), codes in _by_hand(cfg, params, batches, qcfg, q).items():
    got = _codes(q, i, tuple(path))
    assert np.mean(got == codes) >= 0.99, (i, path, np.mean(got == codes))
  plain = quantize(params, batches, qcfg.replace(gptaq=False), model_config=cfg, mesh=None,
                   progress=False)
  # Block 0's q/k/v see float inputs in both streams (dXXT = 0): GPTAQ is GPTQ there; later
  # layers differ.
  p0 = ("self_attn", "q_proj")
  assert np.mean(_codes(q, 0, p0) == _codes(plain, 0, p0)) >= 0.999
  assert np.mean(_codes(q, 1, ("mlp", "down_proj")) != _codes(plain, 1, ("mlp", "down_proj"))) > 0.01
