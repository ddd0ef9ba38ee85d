"""The CLI's streamed path: device memory by accounting, bfloat16 calibration against float32.

One in-process run of ``quantize_llama.py --dtype bfloat16`` on the tiny 6-block folder, with a
spy that sums the bytes of every live device array at each step of the driver (each block read,
each solve, each block done, each evaluation advance). The float32 reference is the module run of
``quantize_test.py`` (same settings, float32).
"""

from __future__ import annotations

import contextlib
import io
import math

import jax
import numpy as np
import pytest

from gptq_jax import checkpoint
from gptq_jax.cli.quantize import main
from tests.cli.conftest import FAST, LAYERS
from tests.cli.quantize_test import full_run  # noqa: F401 (the float32 run, a module fixture)

EVAL_WINDOWS = 3


def _device_bytes(before: frozenset = frozenset()) -> dict:
  """Bytes of live device arrays per device (a replicated array counts on every device), except
  the arrays whose ids are in ``before`` (alive before the run: other tests' fixtures)."""
  out: dict = {}
  for x in jax.live_arrays():
    if id(x) in before:
      continue
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def _accounted_run(args: list[str], patches=()) -> tuple[list, str, str]:
  """``main(args)`` in this process with a spy summing the live device bytes at each step of the
  driver; -> (samples, stdout, stderr). ``patches``: more (object, name, value) to set."""
  from gptq_jax.cli import stream
  from gptq_jax.pipeline import driver

  samples = []
  # Only the arrays the run creates are counted: whatever earlier tests left alive is excluded
  # by id (and kept referenced until the run ends, so that no id is reused by a new array).
  earlier = jax.live_arrays()
  before = frozenset(id(x) for x in earlier)

  def sample(where):
    now = _device_bytes(before)
    samples.append((where, max(now.values(), default=0)))

  mp = pytest.MonkeyPatch()
  get_block, set_block = stream.StreamedRun.get_block, stream.StreamedRun.set_block
  advance, solve = stream.EvalStream.advance, driver.solve_shared
  mp.setattr(stream.StreamedRun, "get_block",
             lambda self, p, i: (lambda b: sample(f"read {i}") or b)(get_block(self, p, i)))
  mp.setattr(stream.StreamedRun, "set_block",
             lambda self, p, i, b: sample(f"done {i}") or set_block(self, p, i, b))
  mp.setattr(stream.EvalStream, "advance",
             lambda self, run, b, *rest: advance(self, run, b, *rest) or sample("eval"))
  mp.setattr(driver, "solve_shared",
             lambda ks, h, c, n, **kw: sample(f"solve {n[0]}") or solve(ks, h, c, n, **kw))
  for obj, name, value in patches:
    mp.setattr(obj, name, value)
  err, out = io.StringIO(), io.StringIO()
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      code = main(args)
  finally:
    mp.undo()
  assert code == 0, err.getvalue()
  del earlier
  return samples, out.getvalue(), err.getvalue()


def _with_eval(args: list[str]) -> list[str]:
  args = list(args)
  args[args.index("--eval-text"):args.index("--eval-text") + 2] = ["--eval-windows",
                                                                  str(EVAL_WINDOWS)]
  return args


@pytest.fixture(scope="module")
def bf16_run(tiny_hf_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bf16") / "q")
  samples, _, _ = _accounted_run(_with_eval(["--model", tiny_hf_dir, "--output", out, *FAST,
                                             "--dtype", "bfloat16"]))
  return out, samples


def _check_budget(samples, folder: str, itemsize: int) -> None:
  """Never more than the embedding + two blocks + the activations on any device."""
  from gptq_jax.models import HFCheckpoint

  ckpt = HFCheckpoint(folder)
  cfg = ckpt.config
  block = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(ckpt.layer_params(0))) * itemsize
  embed = cfg.vocab_size * cfg.hidden_size * itemsize
  ckpt.close()
  nsamples, seqlen, h = 4, 32, cfg.hidden_size
  activations = (nsamples * seqlen * (h * itemsize + 2 * 4)  # calibration hidden, mask, positions
                 + 2 * EVAL_WINDOWS * seqlen * (h * itemsize + 2 * 4)  # before / after streams
                 # the inputs kept between passes (o's, gate/up's, down's: pipeline/stash.py)
                 + nsamples * seqlen * (2 * h + cfg.intermediate_size) * itemsize
                 + 2 * max(h, cfg.intermediate_size) ** 2 * 4)  # a group's Hessians (float32)
  budget = embed + 2 * block + activations
  assert len(samples) > 4 * LAYERS and {w for w, _ in samples} >= {f"read {LAYERS - 1}", "eval"}
  worst = max(samples, key=lambda s: s[1])
  assert worst[1] <= budget, (worst, dict(embed=embed, block=block, activations=activations))
  assert worst[1] < embed + LAYERS * block  # the check can tell a resident model apart


def test_device_memory_is_embedding_two_blocks_and_activations(bf16_run, tiny_hf_dir):
  _check_budget(bf16_run[1], tiny_hf_dir, 2)


def test_bf16_calibration_perplexity_within_1pct_of_float32(bf16_run, full_run, tiny_hf_dir):
  """Both results scored the same way (float32 compute, the same held-out windows)."""
  from gptq_jax import data, eval as evaluation
  from gptq_jax.models import load_tokenizer

  out, _ = bf16_run
  a, b = checkpoint.load(out), checkpoint.load(full_run[0])
  assert a.model_config.dtype == "bfloat16" and b.model_config.dtype == "float32"
  tokens = data.tokenize_text(data.sotu_texts("eval"), load_tokenizer(tiny_hf_dir))

  def ppl(ck):
    params = jax.tree.map(lambda x: np.asarray(x, np.float32) if x.dtype.kind == "V" or
                          str(x.dtype) == "bfloat16" else x, ck.params)
    return evaluation.perplexity(params, ck.model_config.replace(dtype="float32"), tokens,
                                 seqlen=32, max_windows=EVAL_WINDOWS)

  p16, p32 = ppl(a), ppl(b)
  assert abs(p16 / p32 - 1) < 0.01, (p16, p32)
  same = []
  for i in range(LAYERS):
    for proj in ("q_proj", "o_proj"):
      ca = np.asarray(a.params[f"layers_{i}"]["self_attn"][proj]["kernel"].unpack().codes)
      cb = np.asarray(b.params[f"layers_{i}"]["self_attn"][proj]["kernel"].unpack().codes)
      same.append(np.mean(ca == cb))
  assert np.mean(same) > 0.8, same  # bf16 moves some codes, not most


# ----- --rotation hadamard (with --lm-head), streamed: rotated as each piece is read ------------

@pytest.fixture(scope="module")
def rotated_run(tiny_hf_dir, tmp_path_factory):
  """The CLI with ``--rotation hadamard --lm-head`` and evaluation, float32, the vocabulary
  (320 tokens) read in slices of 96 rows; a fresh temporary folder and no HF folder writer, to
  see that no copy of the model is written. On one device: ``--lm-head`` on several is not
  this test's subject (the quantized head's Hessian and solve, pipeline/dynamic.py)."""
  import functools
  import tempfile

  import gptq_jax.pipeline
  from gptq_jax.cli import source
  from gptq_jax.models import hf

  def no_copy(*args, **kwargs):
    raise AssertionError("a copy of the model was written")

  tmp = tmp_path_factory.mktemp("tmpdir")
  out = str(tmp_path_factory.mktemp("rot") / "q")
  args = _with_eval(["--model", tiny_hf_dir, "--output", out, *FAST, "--rotation", "hadamard",
                     "--lm-head"])
  samples, stdout, stderr = _accounted_run(args, patches=[
      (source, "ROW_CHUNK_BYTES", 96 * 64 * 4), (tempfile, "tempdir", str(tmp)),
      (hf, "save_hf_folder", no_copy),
      (gptq_jax.pipeline, "quantize", functools.partial(gptq_jax.pipeline.quantize, mesh=None))])
  assert not list(tmp.iterdir())  # nothing written to the temporary folder
  return out, samples, stdout, stderr


def test_rotated_run_device_memory_is_embedding_two_blocks_and_activations(rotated_run,
                                                                          tiny_hf_dir):
  _check_budget(rotated_run[1], tiny_hf_dir, 4)


def test_rotated_run_equals_rotate_model_then_quantize(rotated_run, tiny_hf_dir):
  """The oracle: ``rotate_model`` on the whole model, ``quantize`` in this process. The float
  perplexity before equals the unrotated model's (a rotation keeps the function)."""
  from gptq_jax import GPTQConfig, data, eval as evaluation
  from gptq_jax.models import load_model, load_tokenizer
  from gptq_jax.pipeline import quantize
  from gptq_jax.pipeline.rotation import rotate_model

  out, _, stdout, _ = rotated_run
  ck = checkpoint.load(out)
  cfg = GPTQConfig(4, group_size=32, desc_act=True, act_group_aware=False, nsamples=4,
                   seqlen=32, rotation="hadamard", lm_head=True)
  assert ck.quant_config == cfg and not ck.model_config.tie_word_embeddings
  model_config, params = load_model(tiny_hf_dir)
  rcfg, rparams = rotate_model(model_config, params, "hadamard", seed=0)
  tokenizer = load_tokenizer(tiny_hf_dir)
  batches = data.text_calib_batches(data.sotu_texts("calib"), tokenizer, nsamples=4, seqlen=32)
  want = quantize(rparams, batches, cfg, model_config=rcfg, mesh=None, progress=False)
  got_leaves = jax.tree_util.tree_leaves_with_path(ck.params)
  want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
  assert len(got_leaves) == len(want_leaves)
  for path, x in got_leaves:
    x, y = np.asarray(x), np.asarray(want_leaves[path])
    assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
    if x.dtype.kind == "f":  # the embedding rows / head slices: products of other shapes
      np.testing.assert_allclose(x, y, rtol=0, atol=1e-6 * np.abs(y).max(),
                                 err_msg=jax.tree_util.keystr(path))
    else:  # packed codes, zero points and g_idx: the same
      assert np.mean(x == y) >= 0.999, jax.tree_util.keystr(path)
  tokens = data.tokenize_text(data.sotu_texts("eval"), tokenizer)
  ppl = lambda p, c: evaluation.perplexity(p, c, tokens, seqlen=32,  # noqa: E731
                                           max_windows=EVAL_WINDOWS)
  before, after = ppl(params, model_config), ppl(want, rcfg)
  assert f"before {before:.3f}, after {after:.3f}" in stdout, (stdout, before, after)


def test_rotated_run_shows_every_phase_after_the_blocks(rotated_run):
  stderr = rotated_run[3]
  # 4 slices of the vocabulary; the checkpoint: 4 embedding slices, then the rest (the head is
  # quantized: no float head slices)
  for line in ("[evaluation] 4/4 slices of the vocabulary", "[checkpoint] 5/5 parts"):
    assert line in stderr, stderr
