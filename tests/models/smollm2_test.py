"""SmolLM2-135M real weights (fp32) against transformers' LlamaForCausalLM holding the same
weights: logits, perplexity on held-out SOTU text, greedy generation with and without the cache."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch

from gptq_jax.eval import generate, perplexity
from gptq_jax.models import forward
from gptq_jax.models.testing import torch_logits

pytestmark = pytest.mark.slow
SEQLEN = 256


def test_logits_match_transformers(smollm2, smollm2_torch, sotu_eval_tokens):
  cfg, params = smollm2
  ids = sotu_eval_tokens[None, 1000:1000 + 300]
  ref = torch_logits(smollm2_torch, ids)
  ours = np.asarray(jax.jit(forward, static_argnums=1)(params, cfg, ids))
  scale = np.abs(ref).max()
  assert np.abs(ours - ref).max() <= 1e-3 * scale
  assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_perplexity_matches_transformers(smollm2, smollm2_torch, sotu_eval_tokens):
  cfg, params = smollm2
  windows = 4
  ours = perplexity(params, cfg, sotu_eval_tokens, seqlen=SEQLEN, max_windows=windows,
                    batch_size=2)
  losses = []
  with torch.no_grad():
    for w in range(windows):
      ids = torch.tensor(sotu_eval_tokens[w * SEQLEN:(w + 1) * SEQLEN][None].astype(np.int64))
      losses.append(float(smollm2_torch(ids, labels=ids).loss))
  ref = math.exp(np.mean(losses))
  assert abs(ours / ref - 1) < 0.005
  assert 5 < ours < 40  # an English text under a working 135M model (not a permutation bug)


def test_greedy_generation_cache_equals_no_cache(smollm2, smollm2_torch, smollm2_tokenizer):
  cfg, params = smollm2
  prompt = np.asarray(smollm2_tokenizer("The State of the Union is")["input_ids"], np.int32)
  cached = generate(params, cfg, prompt, max_new_tokens=32)
  # Without the cache every token reruns the whole prefix (a program per length): the first 12
  # greedy tokens, which the cached run's first 12 must equal.
  uncached = generate(params, cfg, prompt, max_new_tokens=12, use_cache=False)
  np.testing.assert_array_equal(cached[:len(prompt) + 12], uncached)
  with torch.no_grad():
    ref = smollm2_torch.generate(torch.tensor(prompt[None].astype(np.int64)), max_new_tokens=32,
                                 min_new_tokens=32, do_sample=False)
  np.testing.assert_array_equal(cached, ref[0].numpy())
