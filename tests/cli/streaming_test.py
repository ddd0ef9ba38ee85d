"""The CLI's streamed path: device memory by accounting, bfloat16 calibration against float32.

One in-process run of ``quantize_llama.py --dtype bfloat16`` on the tiny 6-block folder, with a
spy that sums the bytes of every live device array at each step of the driver (each block read,
each solve, each block done, each evaluation advance). The float32 reference is the module run of
``quantize_test.py`` (same settings, float32).
"""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def bf16_run(tiny_hf_dir, tmp_path_factory):
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
  out = str(tmp_path_factory.mktemp("bf16") / "q")
  args = ["--model", tiny_hf_dir, "--output", out, *FAST, "--dtype", "bfloat16"]
  args[args.index("--eval-text"):args.index("--eval-text") + 2] = ["--eval-windows",
                                                                  str(EVAL_WINDOWS)]
  try:
    assert main(args) == 0
  finally:
    mp.undo()
  del earlier
  return out, samples


def test_device_memory_is_embedding_two_blocks_and_activations(bf16_run, tiny_hf_dir):
  """Never more than the embedding + two blocks + the activations on any device."""
  from gptq_jax.models import HFCheckpoint

  _, samples = bf16_run
  ckpt = HFCheckpoint(tiny_hf_dir)
  cfg = ckpt.config
  bf16 = 2
  block = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(ckpt.layer_params(0))) * bf16
  embed = cfg.vocab_size * cfg.hidden_size * bf16
  ckpt.close()
  nsamples, seqlen, h = 4, 32, cfg.hidden_size
  activations = (nsamples * seqlen * (h * bf16 + 2 * 4)  # calibration hidden, mask, positions
                 + 2 * EVAL_WINDOWS * seqlen * (h * bf16 + 2 * 4)  # before / after eval streams
                 # the inputs kept between passes (o's, gate/up's, down's: pipeline/stash.py)
                 + nsamples * seqlen * (2 * h + cfg.intermediate_size) * bf16
                 + 2 * max(h, cfg.intermediate_size) ** 2 * 4)  # a group's Hessians (float32)
  budget = embed + 2 * block + activations
  assert len(samples) > 4 * LAYERS and {w for w, _ in samples} >= {f"read {LAYERS - 1}", "eval"}
  worst = max(samples, key=lambda s: s[1])
  assert worst[1] <= budget, (worst, dict(embed=embed, block=block, activations=activations))
  assert worst[1] < embed + LAYERS * block  # the check can tell a resident model apart


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
