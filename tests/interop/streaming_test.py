"""quantize_folder: a float HF folder quantized block by block from disk equals quantize() in memory."""

import json
import os

import numpy as np

from gptq_jax.interop import StreamingLlamaAdapter, import_hf, quantize_folder
from gptq_jax.models import HFCheckpoint, save_hf_folder


def test_streaming_equals_in_memory(tiny_llama, quantized, tmp_path, monkeypatch):
  cfg, params, ids = tiny_llama
  qcfg, qparams = quantized(4, False)
  src = str(tmp_path / "float")
  save_hf_folder(src, cfg, params)
  reads = []
  get_block = StreamingLlamaAdapter.get_block
  monkeypatch.setattr(StreamingLlamaAdapter, "get_block",
                      lambda self, p, i: reads.append((i, sorted(p))) or get_block(self, p, i))
  out = quantize_folder(src, ids, qcfg, str(tmp_path / "gptq"), mesh=None, progress=False)
  # The driver's params never held a block: only the embedding; each block was read once.
  assert reads == [(0, ["embed_tokens"]), (1, ["embed_tokens"])]
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    files = set(json.load(f)["weight_map"].values())
  assert len(files) == cfg.num_hidden_layers + 1  # one shard per block, one for the rest
  model_config, streamed, read_cfg = import_hf(out)
  assert model_config == cfg and read_cfg == qcfg
  for i in range(cfg.num_hidden_layers):
    for group, projs in qparams[f"layers_{i}"].items():
      for proj, leaf in projs.items():
        if not isinstance(leaf, dict) or "kernel" not in leaf:
          continue
        a, b = streamed[f"layers_{i}"][group][proj]["kernel"], leaf["kernel"]
        np.testing.assert_array_equal(np.asarray(a.qweight), np.asarray(b.qweight))
        np.testing.assert_array_equal(np.asarray(a.qzeros), np.asarray(b.qzeros))
        np.testing.assert_array_equal(np.asarray(a.scales),
                                      np.asarray(b.scales).astype(np.float16).astype(np.float32))
  ckpt = HFCheckpoint(src)
  np.testing.assert_array_equal(np.asarray(streamed["lm_head"]["kernel"]),
                                ckpt.get("lm_head.weight").T.astype(np.float16).astype(np.float32))
  ckpt.close()
