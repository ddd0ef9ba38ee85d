"""Fast generation: one compiled prefill and one compiled decode step for the whole model.

The decoder layers' parameters are stacked once (``DecodeModel``) and run with ``lax.scan``, so the
compiled program holds one copy of the block whatever the depth. Layers of different kinds
(``cfg.layer_kinds``: full and sliding-window attention, each with its own RoPE base; dense or
mixture-of-experts MLPs, which differ in structure and so run on the "loop" path) are selected
inside the scan body by ``lax.switch`` on a per-layer kind index: one branch per kind, compiled
once. The KV cache is one stacked array pair ``[layers, batch, kv_heads, max_len, head_dim]``
carried through the scan and donated to each step, so it is updated in place.

Dense and packed (``PackedWeight`` / ``PreparedWeight``) projections both work: packed weights are
made kernel-ready (``prepare_params``) once, when the ``DecodeModel`` is built.

Two ways to run the layers (``layer_loop``): "scan" (above) and "loop" (layer_loop.py: one
compiled program per layer kind, called once per layer, each layer's weights read in place).
"auto" picks "loop" on CPU, where the scan copies each layer's weight slice before its dots read
it, and whenever the layers differ in structure (e.g. per-module bit widths) or read more than
their own inputs (Gemma 4's per-layer inputs and shared K/V: ``ModelConfig.uniform_layers``), "scan"
elsewhere; the choice and its reason are logged once (``DecodeModel.path``).

Generation (``generate``): a batch of prompts of different lengths is left-padded (and masked) to
a common, bucketed length; positions count real tokens only, so a padded row computes what the
prompt alone computes. Sampling: greedy (temperature 0), temperature, top-k, top-p, keyed by a
seed. Rows stop at EOS independently (their later tokens become the pad id); the loop ends when
every row is done. Tokens can be streamed to a callback as they come.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gptq_jax.kernels.linear import is_quantized
from gptq_jax.kernels.prepare import PreparedWeight, prepare_params
from gptq_jax.models import layer_loop as _loop
from gptq_jax.models import model as _model
from gptq_jax.models.sampling import finish_rows, prompt_positions, select_tokens
from gptq_jax.models.prompts import left_pad, round_up

logger = logging.getLogger("gptq_jax")

PROMPT_BUCKET = 16  # prompt lengths are left-padded up to a multiple of this (fewer compiles)
CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this
LAYER_LOOPS = ("auto", "scan", "loop")
_logged: set[str] = set()


def _layer_types(cfg) -> tuple:
  """Each layer's kind (``LayerKind``: attention type, sparse MLP); None for a config without."""
  kinds = getattr(cfg, "layer_kinds", None)
  return tuple(kinds) if kinds else (None,) * cfg.num_hidden_layers


def _full_perm(w: Any) -> Any:
  """A PreparedWeight with an explicit permutation (identity when it had none)."""
  if isinstance(w, PreparedWeight) and w.perm is None:
    return w.replace(perm=jnp.arange(w.in_features, dtype=jnp.int32))
  return w


def _stack(layers: list[Any]) -> Any:
  """Per-layer trees -> one tree of arrays with a leading layer axis. On CPU the arrays are stacked
  with NumPy (one copy, no per-leaf compiled program); elsewhere on the device."""
  if jax.default_backend() == "cpu":
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *layers)
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *layers)


class DecodeModel:
  """A model prepared for generation: non-layer params, the layers (stacked for "scan", a list
  for "loop"), layer kinds.

  ``params``: any params the decoder accepts (dense arrays, ``PackedWeight``, ``PreparedWeight``,
  ``QuantizedWeight`` kernels); ``cfg``: its config (``params.config`` when None); ``layer_loop``:
  "auto", "scan" or "loop" (module docstring). ``path`` says which runs and why.
  """

  def __init__(self, params: Any, cfg: Any = None, layer_loop: str = "auto"):
    cfg = cfg if cfg is not None else getattr(params, "config", None)
    if cfg is None:
      raise ValueError("no model config: pass cfg, or params that carry one (params.config)")
    if layer_loop not in LAYER_LOOPS:
      raise ValueError(f"layer_loop={layer_loop!r} is not allowed: expected one of {LAYER_LOOPS}")
    if getattr(cfg, "backend", None) == "auto" and jax.default_backend() == "cpu":
      cfg = cfg.replace(backend="xla")  # what "auto" runs here; the TPU / GPU kernels go untraced
    self.cfg = cfg
    n = cfg.num_hidden_layers
    # host (NumPy) leaves, e.g. from a checkpoint, go to the device once, not on every call
    params = jax.tree.map(lambda a: jax.device_put(a) if isinstance(a, np.ndarray) else a,
                          prepare_params(params))
    layers = [params[f"layers_{i}"] for i in range(n)]
    self.rest = {k: v for k, v in params.items() if not k.startswith("layers_")}
    self.layer_types = _layer_types(cfg)
    self.kinds = tuple(dict.fromkeys(self.layer_types))  # distinct layer types, in order
    self.kind_index = jnp.asarray([self.kinds.index(t) for t in self.layer_types], jnp.int32)
    self.layers, self.layer_list = None, layers
    alike = len({_signature(lp) for lp in layers}) == 1
    uniform = getattr(cfg, "uniform_layers", True)
    if layer_loop == "scan" and not uniform:
      raise ValueError("this model's layers differ by kind (Gemma 4's per-layer inputs, shared "
                       "keys / values or per-type head sizes): the scanned decode runs one "
                       "layer structure; use layer_loop='loop' (or 'auto')")
    if layer_loop == "scan" and not alike:
      raise ValueError("the decoder layers' parameters differ in structure (e.g. per-module bit "
                       "widths): the scanned decode needs every layer alike; use "
                       "layer_loop='loop'")
    if layer_loop == "loop":
      why = "requested"
    elif not uniform:
      why = ("Gemma 4's layers differ by kind (per-layer inputs, shared K/V, per-type heads): "
             "one program per kind")
    elif not alike:
      why = "the layers differ in structure (e.g. per-module bit widths), so cannot be stacked"
    elif layer_loop == "auto" and jax.default_backend() == "cpu":
      why = "CPU: each layer's weights are read in place; a scan copies its slice every step"
    else:
      self.layers = _stack_layers(layers)
      why = "requested" if layer_loop == "scan" else "layers alike, stacked"
    self.mode = "loop" if self.layers is None else "scan"
    if self.mode == "scan":
      self.layer_list = None
    self.path = (f"layer_loop={self.mode} ({why}): " + (
        "one compiled program per layer kind, called per layer" if self.mode == "loop" else
        "one compiled program for all layers (lax.scan)"))
    if self.path not in _logged:
      _logged.add(self.path)
      logger.info("gptq_jax generate: %s", self.path)
    leaves = jax.tree.leaves(self.layers if self.mode == "scan" else self.layer_list,
                             is_leaf=is_quantized)
    self.packed = any(is_quantized(a) for a in leaves)

  def init_cache(self, batch: int, max_len: int) -> Any:
    """Zeroed cache: "scan", one stacked ``{"k", "v"}: [layers, batch, kv_heads, max_len,
    head_dim]``; "loop", one such dict per layer without the leading axis."""
    cfg = self.cfg
    if self.mode == "loop":
      return _loop.init_caches(cfg, batch, max_len)
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def prefill(self, cache, prompt, cache_mask, key, sampling, eos, pad):
    """-> (token [b], done [b], cache, logits [b, V])."""
    if self.mode == "loop":
      return _loop.prefill(self.cfg, self.rest, self.layer_list, self.layer_types, cache,
                                prompt, cache_mask, key, sampling, eos, pad)
    return prefill(self.rest, self.layers, self.kind_index, self.cfg, self.kinds, cache, prompt,
                   cache_mask, key, *sampling, eos, pad)

  def decode(self, cache, token, done, cache_mask, slot, position, key, sampling, eos, pad):
    """-> (next token [b], done [b], cache)."""
    if self.mode == "loop":
      return _loop.decode(self.cfg, self.rest, self.layer_list, self.layer_types, cache,
                               token, done, cache_mask, slot, position, key, sampling, eos, pad)
    return decode_step(self.rest, self.layers, self.kind_index, self.cfg, self.kinds, cache,
                       token, done, cache_mask, slot, position, key, *sampling, eos, pad)


def _signature(layer: Any) -> tuple:
  """What must agree between layers for stacking: tree structure, shapes, dtypes, static fields
  (a PreparedWeight's missing permutation counts as present: ``_stack_layers`` fills it in)."""
  def leaf(a):
    if isinstance(a, PreparedWeight):
      return ("prepared", a.bits, a.group_size, a.qweight.shape, a.scales.shape,
              str(a.scales.dtype), str(a.zeros.dtype))
    if is_quantized(a):
      return (type(a).__name__, str(jax.tree.structure(a)),
              tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(a)))
    return (tuple(np.shape(a)), str(getattr(a, "dtype", type(a))))
  leaves, treedef = jax.tree.flatten(jax.tree.map(leaf, layer, is_leaf=is_quantized),
                                     is_leaf=lambda x: isinstance(x, tuple))
  return str(treedef), tuple(leaves)


def _stack_layers(layers: list[Any]) -> Any:
  try:
    return _stack(layers)
  except ValueError:
    # Packed layers whose act-order permutation is present in some layers only: make it
    # explicit everywhere (same numbers), then stack.
    return _stack([jax.tree.map(_full_perm, lp, is_leaf=is_quantized) for lp in layers])


# ----- the scanned forward -----

def _run_layers(cfg, kinds: tuple, layers, kind_index, hidden, positions, cache_mask, cache,
                cache_index):
  """Every layer over ``hidden`` [b, t, h] with the stacked cache -> (hidden, new cache)."""
  modules = [_loop.layer_module(cfg, t) for t in kinds]

  def body(carry, inp):
    h, ck, cv, i = carry
    lp, kind = inp
    layer_cache = {"k": lax.dynamic_index_in_dim(ck, i, 0, keepdims=False),
                   "v": lax.dynamic_index_in_dim(cv, i, 0, keepdims=False)}

    def branch(module):
      def run(lp, h, layer_cache):
        return module.apply({"params": lp}, h, positions, cache_mask, layer_cache, cache_index)
      return run

    branches = [branch(m) for m in modules]
    if len(branches) == 1:
      h, new = branches[0](lp, h, layer_cache)
    else:
      h, new = lax.switch(kind, branches, lp, h, layer_cache)
    ck = lax.dynamic_update_index_in_dim(ck, new["k"].astype(ck.dtype), i, 0)
    cv = lax.dynamic_update_index_in_dim(cv, new["v"].astype(cv.dtype), i, 0)
    return (h, ck, cv, i + 1), None

  init = (hidden, cache["k"], cache["v"], jnp.int32(0))
  (hidden, ck, cv, _), _ = lax.scan(body, init, (layers, kind_index))
  return hidden, {"k": ck, "v": cv}


def _embed(rest, cfg, ids):
  return _model.embed(rest, cfg, ids)


def _logits(rest, cfg, hidden):
  return _model.final_logits(rest, cfg, hidden)


def scanned_forward(dm_rest, dm_layers, kind_index, cfg, kinds, ids, cache, cache_index,
                    cache_mask, positions, last_only: bool = False):
  """Like ``forward_with_cache`` with stacked layers: ids [b, t] -> (logits f32, new cache)."""
  hidden = _embed(dm_rest, cfg, ids)
  hidden, cache = _run_layers(cfg, kinds, dm_layers, kind_index, hidden, positions, cache_mask,
                              cache, cache_index)
  if last_only:
    hidden = hidden[:, -1:]
  return _logits(dm_rest, cfg, hidden), cache


# ----- the scanned prefill and decode step -----

@functools.partial(jax.jit, static_argnums=(3, 4, 9, 10, 11), donate_argnums=(5,))
def prefill(rest, layers, kind_index, cfg, kinds, cache, prompt, cache_mask, key, temperature,
            top_k, top_p, eos, pad):
  """prompt [b, p] (left-padded) at slots 0..p-1 -> (token [b], done [b], cache, logits [b, V])."""
  positions = prompt_positions(cache_mask, prompt.shape[1])
  logits, cache = scanned_forward(rest, layers, kind_index, cfg, kinds, prompt, cache, 0,
                                  cache_mask, positions, last_only=True)
  logits = logits[:, -1]
  token = select_tokens(logits, key, temperature, top_k, top_p)
  token, done = finish_rows(token, jnp.zeros(token.shape, bool), eos, pad)
  return token, done, cache, logits


@functools.partial(jax.jit, static_argnums=(3, 4, 12, 13, 14), donate_argnums=(5,))
def decode_step(rest, layers, kind_index, cfg, kinds, cache, token, done, cache_mask, slot,
                position, key, temperature, top_k, top_p, eos, pad):
  """token [b] written at ``slot`` (traced: one compile for every step) -> (next, done, cache)."""
  logits, cache = scanned_forward(rest, layers, kind_index, cfg, kinds, token[:, None], cache,
                                  slot, cache_mask, position[:, None])
  token = select_tokens(logits[:, -1], key, temperature, top_k, top_p)
  token, done = finish_rows(token, done, eos, pad)
  return token, done, cache


def compiled_count() -> int:
  """How many programs generation has compiled so far (this process), both layer loops."""
  return prefill._cache_size() + decode_step._cache_size() + _loop.compiled_count()


# ----- generation -----

_LAST: list = []  # one-entry cache: (params, cfg, layer_loop, DecodeModel)


def decode_model(params: Any, cfg: Any = None, layer_loop: str = "auto") -> DecodeModel:
  """``DecodeModel(params, cfg, layer_loop)``, reused while the same params object is passed
  again."""
  if isinstance(params, DecodeModel):
    return params
  if _LAST and _LAST[0][0] is params and _LAST[0][1] == cfg and _LAST[0][2] == layer_loop:
    return _LAST[0][3]
  _LAST.clear()  # the previous model's device copies go before this one's are made
  dm = DecodeModel(params, cfg, layer_loop)
  _LAST[:] = [(params, cfg, layer_loop, dm)]
  return dm


def forget_last() -> None:
  """Drop the model ``decode_model`` keeps for the next call with the same params (it holds the
  params and their prepared device copies: a whole model, until the next call replaces it)."""
  _LAST.clear()


class GenerateResult(dict):
  """``tokens`` [b, max_new] (pad after EOS), ``lengths`` [b] new tokens up to and including EOS,
  ``ttft`` seconds to the first token, ``decode_time`` seconds of the rest, ``steps``."""

  __getattr__ = dict.__getitem__


def generate(params: Any, cfg: Any, prompt_ids: Any, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, attention_mask: Any = None, eos_token_id: Any = "config",
             pad_token_id: int | None = None, stop_at_eos: bool = True,
             on_token: Callable[[np.ndarray, int], None] | None = None,
             layer_loop: str = "auto") -> GenerateResult:
  """Generate up to ``max_new_tokens`` per prompt with the compiled prefill and decode step.

  prompt_ids: one prompt ``[p]`` (list or array), a list of prompts of any lengths, or a
  left-padded ``[b, p]`` array with ``attention_mask``. eos_token_id: "config" (the model's), None,
  an int or a list. on_token(tokens [b], step): called on the host after every step (streaming).
  layer_loop: "auto", "scan" or "loop" (see ``DecodeModel``; ignored for a ``DecodeModel``).
  Returns a ``GenerateResult`` (see there); ``tokens`` are the new tokens only.
  """
  dm = decode_model(params, cfg, layer_loop)
  cfg = dm.cfg
  if isinstance(prompt_ids, np.ndarray) or (hasattr(prompt_ids, "shape") and
                                            hasattr(prompt_ids, "dtype")):
    arr = np.asarray(prompt_ids, np.int32)
    arr = arr[None] if arr.ndim == 1 else arr
    mask = (np.ones_like(arr) if attention_mask is None
            else np.asarray(attention_mask, np.int32).reshape(arr.shape))
    prompts = [row[m != 0] for row, m in zip(arr, mask)]
  elif len(prompt_ids) and np.ndim(prompt_ids[0]) == 0:
    prompts = [np.asarray(prompt_ids, np.int32)]
  else:
    prompts = [np.asarray(p, np.int32) for p in prompt_ids]
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: expected >= 1")
  for p in prompts:
    if p.min() < 0 or p.max() >= cfg.vocab_size:
      raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
  if eos_token_id == "config":
    eos_ids = tuple(getattr(cfg, "eos_token_ids", ()))
  elif eos_token_id is None:
    eos_ids = ()
  else:
    eos_ids = tuple(np.atleast_1d(np.asarray(eos_token_id, np.int64)).tolist())
  if not stop_at_eos:
    eos_ids = ()
  pad = pad_token_id if pad_token_id is not None else (
      eos_ids[0] if eos_ids else (getattr(cfg, "pad_token_id", None) or 0))

  b = len(prompts)
  p_len = round_up(max(len(p) for p in prompts), PROMPT_BUCKET)
  max_len = round_up(p_len + max_new_tokens, CACHE_BUCKET)
  ids, mask = left_pad(prompts, p_len)
  cache_mask = np.concatenate([mask, np.ones((b, max_len - p_len), np.int32)], axis=1)
  temperature = float(temperature)
  top_k = int(top_k) if top_k else None
  top_p = float(top_p) if top_p is not None and top_p < 1.0 else None
  sampling = (temperature, top_k, top_p)
  key = jax.random.key(seed)
  eos = jnp.asarray(eos_ids, jnp.int32).reshape(-1)
  pad_j = jnp.int32(pad)

  t0 = time.perf_counter()
  cache = dm.init_cache(b, max_len)
  cache_mask_j = jnp.asarray(cache_mask)
  token, done, cache, _ = dm.prefill(cache, jnp.asarray(ids), cache_mask_j,
                                     jax.random.fold_in(key, 0), sampling, eos, pad_j)
  out = [np.asarray(token)]
  ttft = time.perf_counter() - t0
  if on_token is not None:
    on_token(out[-1], 0)
  position = jnp.asarray(mask.sum(axis=1), jnp.int32)  # the next position of each row
  t1 = time.perf_counter()
  steps = 1
  done_host = np.asarray(done)
  for step in range(1, max_new_tokens):
    if done_host.all():
      break
    token, done, cache = dm.decode(cache, token, done, cache_mask_j, jnp.int32(p_len + step - 1),
                                   position, jax.random.fold_in(key, step), sampling, eos, pad_j)
    position = position + 1
    out.append(np.asarray(token))
    done_host = np.asarray(done)
    steps += 1
    if on_token is not None:
      on_token(out[-1], step)
  decode_time = time.perf_counter() - t1
  tokens = np.full((b, max_new_tokens), pad, np.int32)
  tokens[:, :len(out)] = np.stack(out, axis=1)
  lengths = np.full(b, len(out), np.int64)
  if eos_ids:
    is_eos = np.isin(tokens, np.asarray(eos_ids))
    first = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, max_new_tokens)
    lengths = np.minimum(first, len(out))
  return GenerateResult(tokens=tokens, lengths=lengths, ttft=ttft, decode_time=decode_time,
                        steps=steps, prompts=prompts)


__all__ = ["DecodeModel", "GenerateResult", "compiled_count", "decode_model", "decode_step",
           "generate", "left_pad", "prefill", "scanned_forward", "select_tokens"]
