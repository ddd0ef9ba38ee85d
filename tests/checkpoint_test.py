"""orbax checkpoints: a quantized tiny Llama saved here and reloaded in a fresh process gives the
same logits and the same greedy generation, bit for bit; saves never overwrite."""

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
from gptq_jax.eval import generate
from gptq_jax.models import LlamaConfig, forward, init_params
from gptq_jax.pipeline import dense_block
from tests.xla_env import one_device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RELOAD = """
import json, sys
import numpy as np
from gptq_jax import checkpoint
from gptq_jax.eval import generate
from gptq_jax.models import forward
from gptq_jax.pipeline import dense_block
folder, ids_file, out_file = sys.argv[1:]
ckpt = checkpoint.load(folder)
ids = np.load(ids_file)
dense = dense_block(ckpt.params)
np.save(out_file, np.asarray(forward(dense, ckpt.model_config, ids)))
np.save(out_file + ".packed.npy", np.asarray(forward(ckpt.params, ckpt.model_config, ids)))
tokens = generate(dense, ckpt.model_config, ids[0, :5], max_new_tokens=8)
print(json.dumps({"tokens": tokens.tolist(), "quant_config": ckpt.quant_config.to_dict(),
                  "extra": ckpt.meta["note"]}))
"""


@pytest.fixture(scope="module")
def quantized():
  cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    tie_word_embeddings=True)
  params = init_params(cfg, 1)
  ids = np.random.default_rng(1).integers(0, 128, (4, 24)).astype(np.int32)
  qcfg = gj.GPTQConfig(3, group_size=16, desc_act=True, act_group_aware=False, sym=False,
                      format="gptq_v2")
  qparams = gj.quantize(params, ids, qcfg, model_config=cfg, mesh=None, progress=False)
  return cfg, qcfg, qparams, ids


def test_reload_in_a_fresh_process_gives_identical_logits(quantized, tmp_path):
  cfg, qcfg, qparams, ids = quantized
  folder = str(tmp_path / "ckpt")
  checkpoint.save(folder, qparams, model_config=cfg, quant_config=qcfg, extra={"note": "hi"})
  np.save(tmp_path / "ids.npy", ids)
  env = dict(os.environ, XLA_FLAGS=one_device_flags())
  proc = subprocess.run([sys.executable, "-c", _RELOAD, folder, str(tmp_path / "ids.npy"),
                         str(tmp_path / "logits.npy")], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  dense = dense_block(qparams)
  want_logits = np.asarray(forward(dense, cfg, ids))
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), want_logits)
  # The packed kernels run as they are (kernels.apply_linear), reloaded or not: the same logits.
  np.testing.assert_array_equal(np.load(str(tmp_path / "logits.npy") + ".packed.npy"),
                                np.asarray(forward(qparams, cfg, ids)))
  assert got["tokens"] == generate(dense, cfg, ids[0, :5], max_new_tokens=8).tolist()
  assert got["quant_config"] == qcfg.to_dict() and got["extra"] == "hi"
  # The packed arrays themselves, read back here: same dtypes, shapes and bits.
  back = checkpoint.load(folder)
  assert back.model_config == cfg and back.quant_config == qcfg and back.tokenizer_dir is None
  for a, b in zip(jax.tree.leaves(qparams), jax.tree.leaves(back.params)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  packed = back.params["layers_1"]["self_attn"]["o_proj"]["kernel"]
  assert isinstance(packed, gj.PackedWeight) and (packed.bits, packed.group_size,
                                                   packed.format) == (3, 16, "gptq_v2")


def test_save_never_overwrites(quantized, tmp_path):
  cfg, qcfg, qparams, _ = quantized
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "x").write_text("keep")
  with pytest.raises(FileExistsError, match="already exists"):
    checkpoint.save(str(tmp_path / "taken"), qparams, model_config=cfg, quant_config=qcfg)
  assert (tmp_path / "taken" / "x").read_text() == "keep"
  assert sorted(os.listdir(tmp_path)) == ["taken"]
  # check_output raises the same before any work; a file in the way is named; a new path passes
  with pytest.raises(FileExistsError, match="already exists"):
    checkpoint.check_output(str(tmp_path / "taken"))
  with pytest.raises(NotADirectoryError, match="'.*x' is a file, not a folder"):
    checkpoint.check_output(str(tmp_path / "taken" / "x" / "new" / "ckpt"))
  checkpoint.check_output(str(tmp_path / "new" / "ckpt"))
  assert sorted(os.listdir(tmp_path)) == ["taken"]  # nothing created
  with pytest.raises(FileNotFoundError, match="is not a gptq_jax checkpoint folder"):
    checkpoint.load(str(tmp_path / "taken"))


def test_reload_runs_packed_kernels_on_the_configured_backend(quantized, tmp_path):
  cfg, qcfg, qparams, ids = quantized
  folder = str(tmp_path / "ckpt_xla")
  checkpoint.save(folder, qparams, model_config=cfg, quant_config=qcfg.replace(backend="xla"))
  ckpt = checkpoint.load(folder)
  assert ckpt.model_config.backend == "xla" and cfg.backend == "auto"
  assert ckpt.model_config.replace(backend="auto") == cfg
