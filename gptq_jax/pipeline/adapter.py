"""How the block-sequential driver talks to a decoder model: a small adapter.

The driver needs five things from a model: embed the calibration tokens (the first block's input),
count and address its blocks, run one block, and see the input of each linear layer while a block
runs. ``DecoderAdapter`` names them; ``ModelAdapter`` implements them for the built-in Flax decoder
and is the example to follow for another decoder:

* ``sequential_groups``: the linears of a block, in the order true-sequential GPTQ quantizes them,
  as typed paths inside the block's parameter tree (``("self_attn", "q_proj")``). Each path's
  parameters are a dict with ``"kernel": [in, out]``.
* ``run_block(block_params, hidden, ctx, capture)``: run a block; when ``capture`` is given, call
  ``capture(path, x)`` with the input ``x: [..., in]`` of every linear as it is applied. Layers that
  share an input (q/k/v, gate/up) may pass the same array: the driver computes its Hessian once.
  When ``capture`` returns an array, the linear is applied to it instead of ``x``: the driver feeds
  back an input it kept from an earlier pass (the same values), so the jitted pass no longer needs
  what only produced ``x`` and XLA drops it (pipeline/stash.py). An adapter that ignores the
  return value stays correct, only slower.

Mixture-of-experts blocks: an expert projection (every expert's kernel stacked, ``[E, in, out]``)
reports its input as ``Routed(x, routing)``: ``x`` the token copies sorted by expert and
``routing`` (``models.moe.Routing``) which rows belong to which expert and which token each row
copies, so the driver can take one Hessian per expert from exactly the rows routed to it
(pipeline/experts.py). A block adapter whose blocks differ (dense and sparse layers) gives each
block's own ``sequential_groups`` through ``block_adapter(i)``.
Optional, for a model whose blocks read more than the previous block's output:

* ``block_adapter(i)``: the adapter that runs block ``i`` (its own ``sequential_groups``).
* ``advance_ctx(block_params, hidden, ctx, i) -> ctx``: the context block ``i + 1`` reads, from
  block ``i``'s (quantized) parameters, its input ``hidden`` and its context; with
  ``advances_ctx`` true the driver calls it after each propagation. Gemma 4 uses it to move its
  per-layer input to the next block's slice and to hand the K/V a producer block computes to
  the later blocks that share them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

LinearPath = tuple[str, ...]


class Routed(NamedTuple):
  """An expert projection's input: ``x [rows, in]`` sorted by expert, and its ``routing``
  (``group_sizes [E]``, ``token [rows]``: the token each row copies)."""

  x: jax.Array
  routing: Any


Capture = Callable[[LinearPath, "jax.Array | Routed"], "jax.Array | None"]


def is_routed(x: Any) -> bool:
  return isinstance(x, Routed)

# The built-in families' true-sequential groups (gptq_jax.models.families.SEQUENTIAL_GROUPS).
LLAMA_GROUPS: tuple[tuple[LinearPath, ...], ...] = (
    (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
    (("self_attn", "o_proj"),),
    (("mlp", "gate_proj"), ("mlp", "up_proj")),
    (("mlp", "down_proj"),),
)


class DecoderAdapter(Protocol):
  sequential_groups: tuple[tuple[LinearPath, ...], ...]

  def num_blocks(self, params: Any) -> int: ...

  def get_block(self, params: Any, i: int) -> Any: ...

  def set_block(self, params: Any, i: int, block_params: Any) -> Any: ...

  def embed(self, params: Any, input_ids: jax.Array, attention_mask: jax.Array
            ) -> tuple[jax.Array, Any]:
    """-> (the first block's input [batch, seq, hidden], a context pytree passed to run_block)."""

  def run_block(self, block_params: Any, hidden: jax.Array, ctx: Any,
                capture: Capture | None = None) -> jax.Array: ...


def get_path(tree: Any, path: LinearPath) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: Any, path: LinearPath, value: Any) -> Any:
  """A copy of the nested dict ``tree`` with ``tree[path]`` replaced (shallow copies on the way)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = set_path(tree[path[0]], path[1:], value)
  return out


def block_adapter(adapter: Any, i: int) -> Any:
  """The adapter that runs block ``i``: ``adapter.block_adapter(i)`` when it has one (the built-in
  decoder: one adapter per layer type, so one compiled block function per type), else itself."""
  per_block = getattr(adapter, "block_adapter", None)
  return per_block(i) if per_block is not None else adapter


class ModelAdapter:
  """The built-in Flax decoder (``gptq_jax.models``), any supported family.

  ``kind`` (a ``LayerKind``: attention type "full_attention" / "sliding_attention", whether the
  MLP is a mixture of experts, and whether the block attends over an earlier block's keys /
  values (Gemma 4); a bare layer type string means a dense layer) is the kind of block
  ``run_block`` runs; ``block_adapter(i)`` gives the (cached) adapter of block ``i``'s kind, so
  the jitted block functions keyed on it are compiled once per kind and reused by every block of
  that kind.

  The context (``embed``'s second output) holds ``positions`` and ``attention_mask``; for Gemma 4
  also ``per_layer_inputs`` [batch, seq, layers, P] with the current block's slice
  ``per_layer_input``, and ``shared_kv`` {layer type: the producer block's keys / values}
  (zeros until the producer has run). ``advance_ctx`` updates both after each block, from the
  quantized block: the shared layers see the keys / values of the quantized producer, as they
  will at inference.
  """

  def __init__(self, config, kind: Any = None):
    from gptq_jax.models import families, layers, model, moe  # the model is optional for the core

    if isinstance(kind, str):
      kind = model.LayerKind(kind, False)
    self.config = config
    self.kind = kind
    self.layer_type = None if kind is None else kind.attention
    self.sequential_groups = families.sequential_groups(config, kind)
    self._model = model
    self._linear = layers.Linear
    self._expert_linear = moe.ExpertLinear
    # Gemma 4: the context changes from block to block (per-layer inputs, shared keys / values)
    self.advances_ctx = bool(config.hidden_size_per_layer_input or config.kv_producers)

  @classmethod
  @functools.lru_cache(maxsize=16)
  def for_config(cls, config, kind: Any = None) -> "ModelAdapter":
    """One adapter per (model config, layer kind), so compiled block functions are reused across
    blocks and calls."""
    return cls(config, kind)

  def block_adapter(self, i: int) -> "ModelAdapter":
    return ModelAdapter.for_config(self.config, self.config.layer_kinds[i])

  def _kind(self):
    if self.kind is not None:
      return self.kind
    kinds = set(self.config.layer_kinds)
    if len(kinds) > 1:
      raise ValueError("this model mixes layers of different kinds (sliding and full attention, "
                       "dense and mixture-of-experts MLPs, Gemma 4's shared keys / values): run "
                       "block i through adapter.block_adapter(i) (pipeline.adapter.block_adapter)")
    return kinds.pop()

  def num_blocks(self, params) -> int:
    return self.config.num_hidden_layers

  def get_block(self, params, i):
    return params[f"layers_{i}"]

  def set_block(self, params, i, block_params):
    if hasattr(params, "replace") and hasattr(params, "config"):  # ModelParams keep their config
      return params.replace(**{f"layers_{i}": block_params})
    return {**params, f"layers_{i}": block_params}

  def embed(self, params, input_ids, attention_mask):
    cfg = self.config
    b, t = input_ids.shape
    hidden, per_layer = self._model.embed_inputs(params, cfg, input_ids)
    positions = self._model.default_positions(attention_mask, b, t)
    ctx = {"positions": positions, "attention_mask": attention_mask}
    if per_layer is not None:
      ctx.update(per_layer_inputs=per_layer, per_layer_input=per_layer[:, :, 0])
    if cfg.kv_producers:
      from gptq_jax.models.attention import layer_cache_shape  # noqa: PLC0415

      ctx["shared_kv"] = {kind: {k: jnp.zeros(layer_cache_shape(cfg, kind, b, t), hidden.dtype)
                                 for k in ("k", "v")} for kind in cfg.kv_producers}
    return hidden, ctx

  @staticmethod
  def _extra(ctx, kind) -> dict:
    """The Gemma 4 inputs of this kind of block from the context."""
    extra = {"per_layer_input": ctx.get("per_layer_input")}
    if kind.kv_shared:
      extra["shared_kv"] = ctx["shared_kv"][kind.attention]
    return extra

  def advance_ctx(self, block_params, hidden, ctx, i: int):
    """The context block ``i + 1`` reads (see the class docstring); ``hidden``: block ``i``'s
    input."""
    cfg, ctx = self.config, dict(ctx)
    layer_type = cfg.layer_types[i]
    if cfg.kv_producers.get(layer_type) == i:  # later blocks attend over these keys / values
      _, kv = self._model.block_forward(
          block_params, cfg, hidden, ctx["positions"], ctx["attention_mask"],
          layer_type=layer_type, per_layer_input=ctx.get("per_layer_input"), return_kv=True)
      ctx["shared_kv"] = {**ctx["shared_kv"], layer_type: kv}
    if "per_layer_inputs" in ctx and i + 1 < cfg.num_hidden_layers:
      ctx["per_layer_input"] = ctx["per_layer_inputs"][:, :, i + 1]
    return ctx

  def run_block(self, block_params, hidden, ctx, capture=None):
    kind = self._kind()

    def call():
      return self._model.block_forward(block_params, self.config, hidden, ctx["positions"],
                                       ctx["attention_mask"], layer_type=kind.attention,
                                       sparse=kind.sparse, kv_shared=kind.kv_shared,
                                       **self._extra(ctx, kind))

    if capture is None:
      return call()

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and isinstance(context.module, self._linear):
        given = capture(tuple(context.module.path), args[0])
        if given is not None:  # a kept input: what only fed args[0] becomes dead code
          args = (given,) + tuple(args[1:])
      elif context.method_name == "__call__" and isinstance(context.module, self._expert_linear):
        capture(tuple(context.module.path), Routed(args[0], args[1]))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      return call()


LlamaAdapter = ModelAdapter  # the pre-families name
