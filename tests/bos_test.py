"""`<bos>` at the start of every calibration and evaluation window, when the tokenizer asks for it
(Gemma's does; SmolLM2's and a stand-in byte tokenizer do not)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gptq_jax import data
from gptq_jax.eval import perplexity, window_nll
from gptq_jax.models.testing import tiny_pair

BOS = 7


class BosTokenizer:
  """One token per byte (+10), `<bos>` = 7 prepended, like Gemma's tokenizer."""

  bos_token_id = BOS
  pad_token_id = 0
  eos_token_id = 1

  def __call__(self, text: str, add_special_tokens: bool = True, **kwargs):
    ids = [b + 10 for b in text.encode()]
    return {"input_ids": ([BOS] if add_special_tokens else []) + ids}


class PlainTokenizer(BosTokenizer):
  """Has a bos id but does not add it (SmolLM2's case)."""

  def __call__(self, text: str, add_special_tokens: bool = True, **kwargs):
    return {"input_ids": [b + 10 for b in text.encode()]}


def test_bos_token_id_detection(smollm2_tokenizer):
  assert data.bos_token_id(BosTokenizer()) == BOS
  assert data.bos_token_id(PlainTokenizer()) is None
  assert data.bos_token_id(smollm2_tokenizer) is None

  class Flagged(PlainTokenizer):
    add_bos_token = True

  assert data.bos_token_id(Flagged()) == BOS


def test_calibration_windows_start_with_bos(tmp_path):
  text = data.sotu_texts("calib")[:20000]
  stream = np.asarray(BosTokenizer()(text)["input_ids"][1:])
  batches = data.text_calib_batches(text, BosTokenizer(), nsamples=6, seqlen=64, seed=3,
                                    batch_size=2)
  ids = np.concatenate([b["input_ids"] for b in batches])
  assert ids.shape == (6, 64) and (ids[:, 0] == BOS).all() and (ids[:, 1:] != BOS).all()
  for row in ids:  # the other 63 tokens: a contiguous piece of the text
    starts = [i for i in range(len(stream) - 63) if (stream[i:i + 63] == row[1:]).all()]
    assert starts, row
  assert all((b["attention_mask"] == 1).all() for b in batches)
  # the same through get_calib_batches on a file, and opting out gives Optimum's plain windows
  (tmp_path / "t.txt").write_text(text)
  from_file = data.get_calib_batches(str(tmp_path / "t.txt"), BosTokenizer(), nsamples=6,
                                     seqlen=64, seed=3, batch_size=2)
  np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in from_file]), ids)
  plain = data.text_calib_batches(text, BosTokenizer(), nsamples=6, seqlen=64, seed=3,
                                  bos_token_id=None)
  assert sum(int(b["input_ids"][0, 0] == BOS) for b in plain) <= 1
  unchanged = data.text_calib_batches(text, PlainTokenizer(), nsamples=6, seqlen=64, seed=3)
  assert not any((b["input_ids"] == BOS).any() for b in unchanged)
  with pytest.raises(ValueError, match="bos_token_id"):
    data.text_calib_batches(text, BosTokenizer(), nsamples=2, seqlen=64, bos_token_id="yes")


def test_perplexity_with_bos_matches_transformers():
  hf, cfg, params = tiny_pair(seed=2)
  rng = np.random.RandomState(0)
  tokens = np.concatenate([[BOS], rng.randint(10, 256, size=400)])  # a stream with its own <bos>
  seqlen, n = 48, 5
  losses = []
  with torch.no_grad():
    for w in range(n):
      chunk = tokens[1 + w * (seqlen - 1):1 + (w + 1) * (seqlen - 1)]
      ids = torch.tensor(np.concatenate([[BOS], chunk])[None].astype(np.int64))
      losses.append(float(hf(ids, labels=ids).loss))
  expected = math.exp(np.mean(losses))
  ours = perplexity(params, cfg, tokens, seqlen=seqlen, max_windows=n, batch_size=2,
                    bos_token_id=BOS)
  np.testing.assert_allclose(ours, expected, rtol=1e-4)
  nll, count, windows = window_nll(params, cfg, tokens[1:], seqlen=seqlen, max_windows=n,
                                   bos_token_id=BOS)
  assert (count, windows) == (n * (seqlen - 1), n)
  np.testing.assert_allclose(math.exp(nll / count), expected, rtol=1e-4)
  without = perplexity(params, cfg, tokens, seqlen=seqlen, max_windows=n)
  assert abs(without - expected) / expected > 1e-3  # the <bos> changes what is scored
