"""The compiled generation loop (models/decode.py) against step-by-step decoding without a cache
(eval.generate(use_cache=False): the whole sequence re-run through the plain forward every step),
for every family, dense and packed; batches of different lengths; compilation counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptq_jax import GPTQConfig, rtn_quantize
from gptq_jax.core.weights import PackedWeight
from gptq_jax.eval import generate as reference_generate
from gptq_jax.models import decode
from gptq_jax.models.testing import FAMILY_NAMES, tiny_pair

PROMPT = np.array([1, 17, 42, 99, 5, 230, 64, 7, 150, 33, 12, 200], np.int32)
NEW = 10  # 12 + 10 tokens cross the tiny sliding windows (16)


def packed_params(params, group_size: int = 32):
  """Every decoder projection RTN-quantized (4-bit, asymmetric) and packed; float16 scales."""
  qcfg = GPTQConfig(4, group_size=group_size, sym=False, format="gptq_v2")

  def q(path, a):
    if getattr(path[-1], "key", None) == "kernel" and any(
        getattr(k, "key", "").startswith("layers_") for k in path):
      w = rtn_quantize(jnp.asarray(a), qcfg).pack("gptq_v2")
      return w.replace(scales=w.scales.astype(jnp.float16))
    return a

  return jax.tree_util.tree_map_with_path(q, params)


def varied(params):
  """The tiny random models with tied embeddings mostly predict their input token again (the
  embedding dominates the residual stream); smaller embeddings give varied continuations."""
  return params.replace(embed_tokens={"embedding": params["embed_tokens"]["embedding"] * 0.2})


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
  _, cfg, params = tiny_pair(request.param, seed=3)
  return request.param, cfg, varied(params)


def test_compiled_loop_equals_uncached_decoding(family):
  """Dense weights sampled (the same key per step on both paths, so the same draws), packed
  weights greedy."""
  name, cfg, params = family
  for kind, p, kw in (("dense", params, dict(temperature=1.0, top_k=40, seed=5)),
                      ("packed", packed_params(params), {})):
    want = reference_generate(p, cfg, PROMPT, max_new_tokens=NEW, use_cache=False, **kw)
    want = want[len(PROMPT):]
    got = decode.generate(p, cfg, PROMPT, max_new_tokens=NEW, stop_at_eos=False, **kw)
    np.testing.assert_array_equal(got.tokens[0], want, err_msg=f"{name} {kind}")
    varied_enough = 3 if kind == "dense" else 1  # greedy on tiny random models repeats more
    assert len(set(want.tolist())) > varied_enough, f"{name} {kind}: a degenerate sequence"


@pytest.mark.parametrize("family_name", ["llama", "gemma3_text"])
def test_batch_of_different_lengths_equals_each_alone(family_name):
  _, cfg, params = tiny_pair(family_name, seed=4)
  params = varied(params)
  prompts = [PROMPT, PROMPT[:3], PROMPT[5:12]]
  batch = decode.generate(params, cfg, prompts, max_new_tokens=NEW, stop_at_eos=False)
  for r, p in enumerate(prompts):
    alone = decode.generate(params, cfg, p, max_new_tokens=NEW, stop_at_eos=False)
    np.testing.assert_array_equal(batch.tokens[r], alone.tokens[0], err_msg=f"row {r}")


def test_stop_at_eos_per_row_and_sampling_filters():
  _, cfg, params = tiny_pair("llama", seed=3)
  free = decode.generate(params, cfg, [PROMPT, PROMPT[:4]], max_new_tokens=NEW,
                         stop_at_eos=False).tokens
  eos = int(free[0, 2])  # row 0 emits this at step 2; make it the EOS
  res = decode.generate(params, cfg, [PROMPT, PROMPT[:4]], max_new_tokens=NEW, eos_token_id=eos,
                        pad_token_id=0)
  assert res.lengths[0] == 3 and (res.tokens[0, :3] == free[0, :3]).all()
  assert (res.tokens[0, 3:] == 0).all()
  n1 = res.lengths[1]
  np.testing.assert_array_equal(res.tokens[1, :n1], free[1, :n1])
  # top_k=1 is greedy whatever the temperature; a tiny top_p keeps only the most likely token
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    got = decode.generate(params, cfg, PROMPT, max_new_tokens=NEW, temperature=2.0, seed=9,
                          stop_at_eos=False, **kw)
    np.testing.assert_array_equal(got.tokens[0], free[0], err_msg=str(kw))


def _dots(cfg, params) -> int:
  """Dot ops in the scanned decode step's lowered program (an unrolled layer loop would multiply
  them)."""
  dm = decode.DecodeModel(params, cfg, layer_loop="scan")
  b, max_len = 1, 64
  args = (dm.rest, dm.layers, dm.kind_index, cfg, dm.kinds, dm.init_cache(b, max_len),
          jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), jnp.ones((b, max_len), jnp.int32),
          jnp.int32(3), jnp.zeros((b,), jnp.int32), jax.random.key(0), 0.0, None, None,
          jnp.zeros((1,), jnp.int32), jnp.int32(0))
  return decode.decode_step.lower(*args).as_text().count("dot_general")


@pytest.mark.parametrize("layer_loop", ["scan", "loop"])
def test_compilations_do_not_grow_with_layers_or_tokens(layer_loop):
  """A decode run (model already prepared) compiles the same programs for 2 layers and 4 tokens
  as for 4 layers and 12 tokens. "scan": one prefill, one decode step; "loop": per layer kind one
  prefill and one decode program (both kinds are present at either depth), plus embed and head."""
  runs, models = {}, {}
  for layers, new in ((2, 4), (4, 12)):
    types = (["sliding_attention", "full_attention"] * 2)[:layers]
    _, cfg, params = tiny_pair("gemma3_text", seed=1, num_hidden_layers=layers, layer_types=types,
                               max_position_embeddings=256 + layers)  # a config never compiled
    models[layers] = (cfg, params)
    dm = decode.DecodeModel(params, cfg, layer_loop=layer_loop)
    assert dm.mode == layer_loop
    # every run starts from empty jit caches, so each counts all it compiles whatever ran before
    # in this process (an earlier test may have built the same small eager programs)
    jax.clear_caches()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    # a program read back from a persistent compilation cache (enabled by an earlier CLI call in
    # this process) skips the backend compile: count it as built all the same
    jax.monitoring.register_event_listener(
        lambda event, **kw: compiles.append(event)
        if event == "/jax/compilation_cache/cache_hits" else None)
    try:
      before = decode.compiled_count()
      decode.generate(dm, None, PROMPT, max_new_tokens=new, stop_at_eos=False)
      runs[(layers, new)] = (decode.compiled_count() - before, len(compiles))
    finally:
      jax.monitoring.clear_event_listeners()
  small, large = runs[(2, 4)], runs[(4, 12)]
  # scan: one prefill, one decode step; loop: 2 kinds x (prefill, decode) + 2 embeds + 2 heads
  assert small[0] == large[0] == {"scan": 2, "loop": 8}[layer_loop], runs
  assert small[1] == large[1], runs  # no other program compiled per layer or token
  if layer_loop == "scan":
    small_dots, large_dots = (_dots(*models[n]) for n in (2, 4))
    assert small_dots == large_dots > 0  # the layer body appears once in the program


def test_scan_and_loop_paths_agree():
  """The two layer loops give the same tokens, dense (sampled) and packed (greedy). (Each is
  checked against uncached decoding for every family above and below: "loop" there, as "auto"
  picks it on CPU.)"""
  _, cfg, params = tiny_pair("llama", seed=3)
  params = varied(params)
  for p, kw in ((params, dict(temperature=1.0, top_k=40, seed=5)), (packed_params(params), {})):
    got = {loop: decode.generate(p, cfg, [PROMPT, PROMPT[:5]], max_new_tokens=NEW,
                                 stop_at_eos=False, layer_loop=loop, **kw).tokens
           for loop in ("scan", "loop")}
    np.testing.assert_array_equal(got["scan"], got["loop"])


def test_layers_of_different_bit_widths_run_layer_by_layer():
  """Per-module bit widths (GPTQModel's `dynamic`): the layers cannot be stacked, so "auto" runs
  them one by one (and says so); "scan" refuses with a clear error. Greedy tokens equal the
  uncached step-by-step decoding."""
  _, cfg, params = tiny_pair("llama", seed=3)
  params = varied(params)
  mixed = packed_params(params)
  q8 = GPTQConfig(8, group_size=32, sym=False, format="gptq_v2")
  kernel = jnp.asarray(params["layers_1"]["mlp"]["down_proj"]["kernel"])
  layer1 = dict(mixed["layers_1"])
  down = rtn_quantize(kernel, q8).pack("gptq_v2")
  layer1["mlp"] = dict(layer1["mlp"], down_proj={"kernel": down})
  mixed = mixed.replace(layers_1=layer1)
  dm = decode.DecodeModel(mixed, cfg)
  assert dm.mode == "loop" and "differ in structure" in dm.path, dm.path
  assert "CPU" in decode.DecodeModel(packed_params(params), cfg).path  # alike: CPU's reason
  with pytest.raises(ValueError, match="differ in structure"):
    decode.DecodeModel(mixed, cfg, layer_loop="scan")
  want = reference_generate(mixed, cfg, PROMPT, max_new_tokens=NEW, use_cache=False)
  got = decode.generate(dm, None, PROMPT, max_new_tokens=NEW, stop_at_eos=False)
  np.testing.assert_array_equal(got.tokens[0], want[len(PROMPT):])


def test_the_kept_model_is_one_and_goes_before_the_next_is_made():
  """``decode_model`` keeps the last params' prepared model for the next call with the same
  params, and no more: the previous one is dropped before a new one is built (two whole models
  never live together because of it), and ``forget_last`` drops it."""
  import gc
  import weakref

  _, cfg, params = tiny_pair("llama", seed=3)
  first = decode.decode_model(params, cfg)
  assert decode.decode_model(params, cfg) is first  # reused for the same params
  gone = weakref.ref(first)
  built_with_first_alive = []
  real_init = decode.DecodeModel.__init__

  def spy(self, *a, **kw):
    gc.collect()
    built_with_first_alive.append(gone() is not None)
    real_init(self, *a, **kw)

  del first
  decode.DecodeModel.__init__ = spy
  try:
    second = decode.decode_model(packed_params(params), cfg)
  finally:
    decode.DecodeModel.__init__ = real_init
  assert built_with_first_alive == [False]
  gone = weakref.ref(second)
  del second
  decode.forget_last()
  gc.collect()
  assert gone() is None and decode._LAST == []
