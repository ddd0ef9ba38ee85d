"""ModelSource (cli/source.py): the model read a piece at a time, rotated on read.

The oracle of the streamed rotation is ``rotate_model`` on the whole loaded model (same kind and
seed; itself checked against transformers' logits in tests/pipeline/rotation_test.py): every
block equal bit for bit, the embedding rows and the head slices to float32 rounding. The
perplexity a slice of the vocabulary at a time (``streamed_nll``) is checked against the full
logits' log-softmax, with a dense and a packed head.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptq_jax.cli import source as source_lib
from gptq_jax.cli.source import EMBED, HEAD, ModelSource
from gptq_jax.models import load_model, save_hf_folder
from gptq_jax.models.testing import tiny_pair
from gptq_jax.pipeline.rotation import rotate_model

SLICE_ROWS = 96  # 256-token vocabularies in slices of 96, 96 and 64 rows


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Tiny HF folders: an untied Llama with q/k/v/o biases, a tied Qwen2, and a Gemma 3."""
  out = {}
  for name, family, kw in (("llama", "llama", dict(tie_word_embeddings=False,
                                                   attention_bias=True)),
                           ("qwen2", "qwen2", {}), ("gemma3", "gemma3_text", {})):
    _, cfg, params = tiny_pair(family, 1, **kw)
    folder = str(tmp_path_factory.mktemp(name))
    save_hf_folder(folder, cfg, params)
    out[name] = folder
  return out


@pytest.fixture
def small_slices(monkeypatch):
  monkeypatch.setattr(source_lib, "ROW_CHUNK_BYTES", SLICE_ROWS * 64 * 4)  # hidden 64, float32


def _reads(src, monkeypatch) -> list:
  """Spy: every ``rows`` read of the checkpoint, and no whole read of the embedding or head."""
  seen = []
  rows, get = src.ckpt.rows, src.ckpt.get

  def spy_rows(name, lo, hi):
    seen.append((name, lo, hi))
    return rows(name, lo, hi)

  def spy_get(name, shape=None):
    assert name not in (EMBED, HEAD), f"{name} read whole"
    return get(name, shape)

  monkeypatch.setattr(src.ckpt, "rows", spy_rows)
  monkeypatch.setattr(src.ckpt, "get", spy_get)
  return seen


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_streamed_rotation_equals_rotate_model(folders, name, small_slices, monkeypatch):
  cfg, params = load_model(folders[name])
  want_cfg, want = rotate_model(cfg, params, "hadamard", seed=3)
  src = ModelSource(folders[name], "hadamard", seed=3)
  reads = _reads(src, monkeypatch)
  assert src.config == want_cfg and not src.config.tie_word_embeddings
  for i in range(cfg.num_hidden_layers):  # bit for bit
    got = src.block(i, jnp.float32)
    assert jax.tree.structure(got) == jax.tree.structure(want[f"layers_{i}"])
    jax.tree.map(np.testing.assert_array_equal, got, want[f"layers_{i}"])
  np.testing.assert_array_equal(src.final_norm()["weight"], want["norm"]["weight"])
  assert src.vocab_chunks() == [(0, 96), (96, 192), (192, 256)]
  ids = np.array([200, 3, 3, 95, 96, 0, 255])
  E = np.asarray(want["embed_tokens"]["embedding"])
  np.testing.assert_allclose(src.embedding_rows(ids), E[ids], rtol=0, atol=1e-6 * np.abs(E).max())
  head = np.concatenate([src.head_columns(lo, hi) for lo, hi in src.vocab_chunks()], axis=1)
  K = np.asarray(want["lm_head"]["kernel"])
  np.testing.assert_allclose(head, K, rtol=0, atol=1e-6 * np.abs(K).max())
  assert reads and max(hi - lo for _, lo, hi in reads) <= SLICE_ROWS  # never the whole table
  # the rotation is part of the resume fingerprint
  digests = {ModelSource(folders[name], r, seed=s).digest() for r, s in
             (("none", 3), ("hadamard", 3), ("hadamard", 4), ("random", 3))}
  assert len(digests) == 4


def test_unrotated_pieces_are_the_model(folders, small_slices, monkeypatch):
  """No rotation: the slices are the embedding's and the (tied) head's own rows, read a slice
  at a time; the pieces the checkpoint is assembled from put the tensors back together."""
  cfg, params = load_model(folders["qwen2"])
  src = ModelSource(folders["qwen2"])
  reads = _reads(src, monkeypatch)
  assert src.config == cfg and cfg.tie_word_embeddings
  E = np.asarray(params["embed_tokens"]["embedding"])
  ids = np.array([7, 250, 7, 100])
  np.testing.assert_array_equal(src.embedding_rows(ids), E[ids])
  np.testing.assert_array_equal(src.head_columns(96, 192), E[96:192].T)
  pieces = {key: np.concatenate(list(p), axis=axis)
            for key, _, axis, p in src.nonlayer_pieces("float32")}
  assert list(pieces) == ["embed_tokens"]  # tied: no head of its own
  np.testing.assert_array_equal(pieces["embed_tokens"], E)
  np.testing.assert_array_equal(src.final_norm()["weight"], params["norm"]["weight"])
  assert max(hi - lo for _, lo, hi in reads) <= SLICE_ROWS


def test_gemma_rotation_is_refused_before_any_work(folders, tmp_path, capsys):
  from gptq_jax.cli.quantize import main

  with pytest.raises(ValueError, match="post-feedforward"):
    ModelSource(folders["gemma3"], "hadamard")
  ids = tmp_path / "ids.npy"
  np.save(ids, np.zeros((2, 8), np.int32))
  assert main(["--model", folders["gemma3"], "--output", str(tmp_path / "q"), "--rotation",
               "hadamard", "--eval-text", "none", "--sample-prompt", "", "--dataset", str(ids),
               "--nsamples", "2", "--seqlen", "8"]) == 2
  assert "rotation is not supported for model_type='gemma3_text'" in capsys.readouterr().err
  assert [p.name for p in tmp_path.iterdir()] == ["ids.npy"]


def _full_ppl(params, cfg, hidden, windows) -> float:
  from gptq_jax.models import final_logits

  nll = tokens = 0.0
  for h, w in zip(hidden, windows):
    logp = jax.nn.log_softmax(np.asarray(final_logits(params, cfg, h), np.float64)[:, :-1], -1)
    nll -= np.take_along_axis(logp, w[:, 1:, None], -1).sum()
    tokens += w[:, 1:].size
  return float(np.exp(nll / tokens))


def test_streamed_nll_equals_the_full_logits():
  """Two streams (a dense and a packed head), final logit soft-capping, uneven slices."""
  from gptq_jax.cli.stream import streamed_nll
  from gptq_jax.config import GPTQConfig
  from gptq_jax.core.gptq import rtn_quantize
  from gptq_jax.core.weights import packed_columns

  _, cfg, params = tiny_pair(0, tie_word_embeddings=False)
  cfg = cfg.replace(final_logit_softcapping=5.0)
  rng = np.random.default_rng(0)
  hidden = [jnp.asarray(rng.standard_normal((2, 12, 64)), jnp.float32) for _ in range(2)]
  windows = [rng.integers(0, 256, (2, 12)).astype(np.int32) for _ in range(2)]
  kernel = np.asarray(params["lm_head"]["kernel"])
  packed = rtn_quantize(kernel, GPTQConfig(4, group_size=32)).pack()
  stream = lambda: types.SimpleNamespace(state=[(h, None) for h in hidden],  # noqa: E731
                                         windows=windows)
  chunks = [(0, 96), (96, 192), (192, 256)]
  got = streamed_nll([stream(), stream()],
                     [lambda lo, hi: jnp.asarray(kernel[:, lo:hi]),
                      lambda lo, hi: packed_columns(packed, lo, hi)],
                     params["norm"], cfg, chunks)
  dense = _full_ppl(params, cfg, hidden, windows)
  quantized = _full_ppl({**params, "lm_head": {"kernel": packed}}, cfg, hidden, windows)
  assert abs(dense / quantized - 1) > 1e-4  # the two heads really differ
  np.testing.assert_allclose(got, [dense, quantized], rtol=2e-5)
