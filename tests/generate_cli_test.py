"""scripts/generate.py on a tiny packed model: the orbax checkpoint and its Hugging Face GPTQ export
print the same greedy text, streamed, with the timing line last."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from gptq_jax import GPTQConfig, checkpoint
from gptq_jax.interop import export_hf
from gptq_jax.models.testing import tiny_pair
from tests.models.decode_test import packed_params, varied

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "generate.py")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def byte_tokenizer():
  """A 256-token byte-level tokenizer (one token per byte), built offline."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
  assert len(vocab) == 256
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(tokenizer_object=tok)


def _run(model: str, env: dict) -> tuple[str, dict]:
  out = subprocess.run(
      [sys.executable, SCRIPT, "--model", model, "--prompt", "The capital of",
       "--max-new-tokens", "12", "--no-stop", "--json"],
      capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.rstrip("\n").split("\n")
  return "\n".join(lines[:-1]), json.loads(lines[-1])


def test_orbax_checkpoint_and_hf_export_print_the_same_text(tmp_path):
  _, cfg, params = tiny_pair("llama", seed=3)
  qparams = packed_params(varied(params))
  qcfg = GPTQConfig(4, group_size=32, sym=False, format="gptq_v2")
  tok = byte_tokenizer()
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save(ckpt, qparams, model_config=cfg, quant_config=qcfg, tokenizer=tok)
  assert checkpoint.load(ckpt).tokenizer("ab")["input_ids"] == tok("ab")["input_ids"]
  hf_dir = export_hf(str(tmp_path / "hf"), qparams, cfg, qcfg, tok, dtype="float32")
  env = dict(os.environ, PYTHONPATH=ROOT, GPTQ_JAX_CACHE=str(tmp_path / "jax_cache"))
  env.pop("GPTQ_JAX_NO_COMPILE_CACHE", None)  # this test checks that the cache is written
  text_a, info_a = _run(ckpt, env)
  text_b, info_b = _run(hf_dir, env)
  assert text_a.startswith("The capital of") and len(text_a) > len("The capital of")
  assert text_a == text_b
  assert info_a["texts"] == info_b["texts"] and info_a["new_tokens"] == 12
  # the streamed text is what the library generates
  from gptq_jax.models import decode  # noqa: PLC0415

  ids = tok("The capital of")["input_ids"]
  want = decode.generate(qparams, cfg, ids, max_new_tokens=12, stop_at_eos=False).tokens[0]
  assert info_a["texts"][0] == tok.decode(np.asarray(want).tolist())
  assert os.listdir(tmp_path / "jax_cache"), "the compilation cache was not used"
