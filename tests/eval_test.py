"""Perplexity and generation on a tiny random Llama, against transformers (torch) as the oracle."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gptq_jax.eval import generate, perplexity, window_nll
from gptq_jax.models import save_hf_folder
from gptq_jax.models.testing import tiny_pair

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "perplexity.py")


@pytest.fixture(scope="module")
def tiny():
  return tiny_pair(seed=1)


def _torch_ppl(hf, tokens: np.ndarray, seqlen: int, n: int) -> float:
  losses = []
  with torch.no_grad():
    for w in range(n):
      ids = torch.tensor(tokens[w * seqlen:(w + 1) * seqlen][None].astype(np.int64))
      losses.append(float(hf(ids, labels=ids).loss))
  return math.exp(np.mean(losses))


def test_perplexity_matches_transformers(tiny):
  hf, cfg, params = tiny
  tokens = np.random.RandomState(0).randint(0, 256, size=1000)
  ours = perplexity(params, cfg, tokens, seqlen=96, batch_size=4)  # 10 windows, last batch padded
  np.testing.assert_allclose(ours, _torch_ppl(hf, tokens, 96, 10), rtol=1e-4)
  limited = perplexity(params, cfg, tokens, seqlen=96, max_windows=3)
  np.testing.assert_allclose(limited, _torch_ppl(hf, tokens, 96, 3), rtol=1e-4)
  nll, count, windows = window_nll(params, cfg, tokens, seqlen=96, batch_size=3)
  assert (count, windows) == (950, 10) and math.isclose(math.exp(nll / count), ours, rel_tol=1e-6)


def test_perplexity_errors(tiny):
  _, cfg, params = tiny
  with pytest.raises(ValueError, match="no full window"):
    perplexity(params, cfg, np.arange(10), seqlen=16)
  with pytest.raises(ValueError, match="1-D int"):
    perplexity(params, cfg, np.zeros((2, 64), np.int32), seqlen=16)
  with pytest.raises(ValueError, match=r"\[0, 256\)"):
    perplexity(params, cfg, np.full(64, 300), seqlen=16)


def test_greedy_generation_with_cache_equals_without_and_transformers(tiny):
  hf, cfg, params = tiny
  prompt = np.array([1, 17, 42, 99, 5, 230, 64], np.int32)
  cached = generate(params, cfg, prompt, max_new_tokens=32)
  uncached = generate(params, cfg, prompt, max_new_tokens=32, use_cache=False)
  assert cached.shape == (39,) and (cached[:7] == prompt).all()
  np.testing.assert_array_equal(cached, uncached)
  with torch.no_grad():
    ref = hf.generate(torch.tensor(prompt[None].astype(np.int64)), max_new_tokens=32,
                      min_new_tokens=32, do_sample=False)
  np.testing.assert_array_equal(cached, ref[0].numpy())


def test_left_padded_batch_generates_like_single_prompts(tiny):
  _, cfg, params = tiny
  prompts = [np.array([3, 4, 5, 6, 7, 8], np.int32), np.array([9, 10, 11], np.int32)]
  batch = np.zeros((2, 6), np.int32)
  mask = np.zeros((2, 6), np.int32)
  for r, p in enumerate(prompts):
    batch[r, 6 - len(p):], mask[r, 6 - len(p):] = p, 1
  out = generate(params, cfg, batch, attention_mask=mask, max_new_tokens=12)
  for r, p in enumerate(prompts):
    np.testing.assert_array_equal(out[r, 6:], generate(params, cfg, p, max_new_tokens=12)[len(p):])


def test_sampling_is_seeded_and_filters(tiny):
  _, cfg, params = tiny
  prompt = np.array([1, 2, 3], np.int32)
  kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9)
  a = generate(params, cfg, prompt, seed=0, **kw)
  assert (a == generate(params, cfg, prompt, seed=0, **kw)).all()
  assert (a == generate(params, cfg, prompt, seed=0, use_cache=False, **kw)).all()
  assert (a != generate(params, cfg, prompt, seed=1, **kw)).any()
  greedy = generate(params, cfg, prompt, max_new_tokens=16)
  assert (generate(params, cfg, prompt, seed=5, max_new_tokens=16, temperature=1.0,
                   top_k=1) == greedy).all()
  assert (generate(params, cfg, prompt, seed=5, max_new_tokens=16, temperature=1.0,
                   top_p=1e-6) == greedy).all()


def test_perplexity_script(tiny, tmp_path):
  hf, cfg, params = tiny
  save_hf_folder(tmp_path / "m", cfg, params)
  tokens = np.random.RandomState(0).randint(0, 256, size=500).astype(np.int32)
  np.save(tmp_path / "t.npy", tokens)
  cmd = [sys.executable, SCRIPT, "--model", str(tmp_path / "m"), "--tokens",
         str(tmp_path / "t.npy"), "--seqlen", "96", "--max-windows", "4", "--json"]
  run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(result["ppl"], _torch_ppl(hf, tokens, 96, 4), rtol=1e-4)
  assert result["windows"] == 4 and result["seqlen"] == 96
  bad = subprocess.run(cmd[:3] + ["meta-llama/Llama-3.2-1B"] + cmd[4:], capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "hub is unreachable" in bad.stderr
  assert "Traceback" not in bad.stderr
