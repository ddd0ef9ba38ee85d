"""The Flax (linen) decoder of every supported family: decoder layers, the causal LM, and pure
block-at-a-time helpers.

Parameters mirror Hugging Face names: `embed_tokens/embedding`, `layers_{i}/self_attn/{q,k,v,o}_proj`,
`layers_{i}/mlp/{gate,up,down}_proj` (each `{"kernel": [in, out]}`, optional "bias"),
`layers_{i}/self_attn/{q,k}_norm/weight` (Qwen3, Gemma 3), `layers_{i}/{input,post_attention}
_layernorm/weight` (+ `{pre,post}_feedforward_layernorm` for Gemma 3), `norm/weight`,
`lm_head/kernel` (untied only); Gemma 4 adds `layers_{i}/per_layer_input_gate`,
`layers_{i}/per_layer_projection`, `layers_{i}/post_per_layer_input_norm`, `layers_{i}/layer_scalar`
and the top-level `embed_tokens_per_layer`, `per_layer_model_projection`,
`per_layer_projection_norm` (models/gemma4.py). The family differences are ModelConfig fields
(config.py).
`attention_mask` is `[batch, seq]`, 1 = real token, 0 = padding; logits are float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptq_jax.models import gemma4
from gptq_jax.models.attention import Attention, KVCache, init_kv_cache
from gptq_jax.models.config import FULL, LayerKind, ModelConfig
from gptq_jax.models.layers import Embed, Linear, RMSNorm
from gptq_jax.models.mlp import MLP, activation
from gptq_jax.models.moe import SparseMoeBlock
from gptq_jax.models.params import ModelParams, plain

Params = dict[str, Any]


def default_positions(attention_mask: jax.Array | None, batch: int, seq: int) -> jax.Array:
  """Positions `[batch, seq]`: 0.. counted over real tokens (so left padding does not shift them)."""
  if attention_mask is None:
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class DecoderLayer(nn.Module):
  """One pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)). Usable on its own.

  With `config.sandwich_norms` (Gemma) the attention and MLP outputs are normed too:
  h = x + post_attention_norm(attn(input_norm(x))); out = h + post_ff_norm(mlp(pre_ff_norm(h))).
  `layer_type` ("full_attention" / "sliding_attention", i.e. `config.layer_types[i]`) picks the
  attention window and RoPE base; `sparse` (`config.sparse_layer(i)`) makes the MLP a mixture of
  experts (models/moe.py; Gemma 4's keeps its dense MLP beside them, models/gemma4.py). Gemma 4:
  `kv_shared` (`config.kv_shared(i)`) makes a layer that attends over its producer's keys /
  values (`shared_kv`) with a possibly double-wide MLP; the per-layer input residual
  (models/gemma4.py) follows the MLP, and `layer_scalar` scales the output.
  """

  config: ModelConfig
  param_dtype: Any = jnp.float32
  layer_type: str = FULL
  sparse: bool = False
  kv_shared: bool = False

  @nn.compact
  def __call__(self, hidden: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None, kv_cache: KVCache | None = None,
               cache_index: jax.Array | int = 0, per_layer_input: jax.Array | None = None,
               shared_kv: KVCache | None = None, return_kv: bool = False):
    """hidden: [batch, seq, hidden] -> same; with `kv_cache` or `return_kv` -> (hidden, kv) with
    the layer's keys / values (its new cache when `kv_cache` is given; see Attention).

    Without a cache `attention_mask` is `[batch, seq]`; with one it is `[batch, max_len]` over the
    cache slots (see attention.py), as for a K/V-sharing layer reading a cached producer.
    positions: [batch, seq]; None = 0.. over real tokens. per_layer_input: [batch, seq, P]
    (Gemma 4's per-layer inputs); shared_kv: the producer's keys / values (kv_shared layers).
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    b, t, _ = hidden.shape
    if attention_mask is None:
      keys = kv_cache if kv_cache is not None else shared_kv
      attention_mask = jnp.ones((b, t if keys is None else keys["k"].shape[2]), jnp.int32)
    if positions is None:
      positions = default_positions(attention_mask if kv_cache is None else None, b, t) + cache_index
    norm = lambda name: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype,  # noqa: E731
                                param_dtype=self.param_dtype, unit_offset=cfg.norm_unit_offset,
                                float_scale=cfg.norm_float_scale, name=name)
    hidden = hidden.astype(dtype)
    with_kv = kv_cache is not None or return_kv
    attn = Attention(cfg, self.param_dtype, self.layer_type, self.kv_shared, name="self_attn")(
        norm("input_layernorm")(hidden), positions, attention_mask, kv_cache, cache_index,
        shared_kv, return_kv)
    attn, kv = attn if with_kv else (attn, None)
    beside = self.sparse and cfg.dense_mlp_beside_experts  # Gemma 4's sparse layers
    if self.sparse and not beside:
      mlp = SparseMoeBlock(cfg, self.param_dtype, name="mlp")
    else:
      mlp = MLP(cfg, self.param_dtype, cfg.layer_intermediate_size(self.kv_shared), name="mlp")
    if cfg.sandwich_norms:
      hidden = hidden + norm("post_attention_layernorm")(attn)
      if beside:
        ff = gemma4.dense_and_experts(cfg, hidden, mlp, norm, self.param_dtype)
      else:
        ff = mlp(norm("pre_feedforward_layernorm")(hidden))
      hidden = hidden + norm("post_feedforward_layernorm")(ff)
    else:
      hidden = hidden + attn
      hidden = hidden + mlp(norm("post_attention_layernorm")(hidden))
    if cfg.hidden_size_per_layer_input:
      linear = lambda name, n_in, n_out: Linear(  # noqa: E731
          n_in, n_out, dtype=dtype, param_dtype=self.param_dtype, name=name)
      hidden = gemma4.per_layer_input_residual(cfg, hidden, per_layer_input, linear, norm,
                                               activation(cfg.hidden_act))
    if cfg.layer_scalar:
      hidden = gemma4.scale_output(hidden, self.param("layer_scalar", nn.initializers.ones, (1,),
                                                      self.param_dtype))
    return (hidden, kv) if with_kv else hidden


class CausalLM(nn.Module):
  """The causal LM: embed (x sqrt(hidden) for Gemma) -> decoder layers -> norm -> lm_head (or the
  tied embedding) -> optional final logit soft cap. Gemma 4: per-layer inputs computed with the
  embedding feed every block; K/V-sharing layers read their producer's keys / values."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                              param_dtype=self.param_dtype)
    self.layers = [DecoderLayer(cfg, self.param_dtype, kind.attention, kind.sparse, kind.kv_shared)
                   for kind in cfg.layer_kinds]
    if cfg.hidden_size_per_layer_input:
      for name, module in gemma4.per_layer_modules(cfg, dtype, self.param_dtype).items():
        setattr(self, name, module)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=self.param_dtype,
                        unit_offset=cfg.norm_unit_offset)
    if not cfg.tie_word_embeddings:
      self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype,
                            param_dtype=self.param_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden: [batch, seq, hidden] (pre-norm) -> logits [batch, seq, vocab] float32."""
    hidden = self.norm(hidden)
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(hidden).astype(jnp.float32)
    else:
      logits = self.lm_head(hidden).astype(jnp.float32)
    cap = self.config.final_logit_softcapping
    return logits if cap is None else jnp.tanh(logits / cap) * cap

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """input_ids: [batch, seq] -> the first block's input [batch, seq, hidden] (compute dtype)."""
    cfg = self.config
    return self.embed_tokens(input_ids, cfg.hidden_size ** 0.5 if cfg.scale_embeddings else None)

  def embed_inputs(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """input_ids: [batch, seq] -> (the first block's input [batch, seq, hidden], Gemma 4's
    per-layer inputs [batch, seq, layers, P] or None)."""
    hidden = self.embed(input_ids)
    if not self.config.hidden_size_per_layer_input:
      return hidden, None
    modules = {k: getattr(self, k) for k in gemma4.PER_LAYER_KEYS}
    return hidden, gemma4.per_layer_inputs(self.config, modules, input_ids, hidden)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None, kv_cache: list[KVCache] | None = None,
               cache_index: jax.Array | int = 0, last_only: bool = False):
    """input_ids: [batch, seq] -> logits [batch, seq, vocab] float32 (and the new caches).

    last_only: logits of the last position only, `[batch, 1, vocab]` (generation's prefill).
    """
    b, t = input_ids.shape
    if positions is None and kv_cache is None:
      positions = default_positions(attention_mask, b, t)
    if attention_mask is None:
      n_keys = t if kv_cache is None else kv_cache[0]["k"].shape[2]
      attention_mask = jnp.ones((b, n_keys), jnp.int32)
    cfg = self.config
    hidden, per_layer = self.embed_inputs(input_ids)
    new_caches = []
    producers, produced = set(cfg.kv_producers.values()), {}  # Gemma 4's shared K/V
    for i, layer in enumerate(self.layers):
      src = cfg.kv_producer(i)
      extra = dict(per_layer_input=None if per_layer is None else per_layer[:, :, i],
                   shared_kv=None if src is None else produced[src])
      if kv_cache is None or src is not None:  # a K/V-sharing layer has no cache of its own
        out = layer(hidden, positions, attention_mask, None, cache_index, **extra,
                    return_kv=i in producers)
        hidden, kv = out if i in producers else (out, None)
      else:
        hidden, kv = layer(hidden, positions, attention_mask, kv_cache[i], cache_index, **extra)
      if kv_cache is not None:
        new_caches.append(kv)
      if i in producers:
        produced[i] = kv
    logits = self.logits(hidden[:, -1:] if last_only else hidden)
    return logits if kv_cache is None else (logits, new_caches)


# ----- pure functional helpers (jit-friendly; `cfg` is static) -----

def _vars(params: Any) -> dict:
  return {"params": plain(params)}


def init_params(cfg: ModelConfig, rng: jax.Array | int = 0, param_dtype: Any = jnp.float32
                ) -> ModelParams:
  """Random parameters (HF's normal(0.02) init; norms at 1, Gemma's (1 + w) norms at 0)."""
  rng = jax.random.key(rng) if isinstance(rng, int) else rng
  ids = jnp.zeros((1, 1), jnp.int32)
  return ModelParams(CausalLM(cfg, param_dtype).init(rng, ids)["params"], cfg)


def forward(params: Params, cfg: ModelConfig | None, input_ids: jax.Array,
            attention_mask: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
  """input_ids: [batch, seq] -> logits [batch, seq, vocab] float32. `cfg` None: `params.config`."""
  cfg = _config(params, cfg)
  return CausalLM(cfg).apply(_vars(params), input_ids, attention_mask, positions)


def forward_with_cache(params: Params, cfg: ModelConfig | None, input_ids: jax.Array,
                       kv_cache: list[KVCache], cache_index: jax.Array | int,
                       cache_mask: jax.Array, positions: jax.Array, last_only: bool = False):
  """Writes `input_ids` [batch, seq] at slot `cache_index` -> (logits [b, seq, vocab], new caches).

  cache_mask: [batch, max_len] valid slots (the new ones included); positions: [batch, seq].
  `cache_index` 0 as a Python int lets the prefill use chunked causal attention. Sliding layers
  keep every slot and mask keys outside their window.
  """
  cfg = _config(params, cfg)
  return CausalLM(cfg).apply(_vars(params), input_ids, cache_mask, positions, kv_cache,
                             cache_index, last_only)


def embed(params: Params, cfg: ModelConfig | None, input_ids: jax.Array) -> jax.Array:
  """input_ids: [batch, seq] -> the first block's input [batch, seq, hidden] (compute dtype)."""
  cfg = _config(params, cfg)
  return CausalLM(cfg).apply({"params": {"embed_tokens": params["embed_tokens"]}}, input_ids,
                             method=CausalLM.embed)


def embed_inputs(params: Params, cfg: ModelConfig | None, input_ids: jax.Array
                 ) -> tuple[jax.Array, jax.Array | None]:
  """input_ids: [batch, seq] -> (the first block's input [batch, seq, hidden], Gemma 4's per-layer
  inputs [batch, seq, layers, P] or None). Reads only the embedding params
  (`families.embedding_keys`)."""
  cfg = _config(params, cfg)
  keys = ("embed_tokens",) + (gemma4.PER_LAYER_KEYS if cfg.hidden_size_per_layer_input else ())
  return CausalLM(cfg).apply({"params": {k: plain(params[k]) for k in keys}}, input_ids,
                             method=CausalLM.embed_inputs)


def block_forward(layer_params: Params, cfg: ModelConfig, hidden: jax.Array,
                  positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                  *, layer_type: str = FULL, sparse: bool = False, kv_shared: bool = False,
                  per_layer_input: jax.Array | None = None, shared_kv: KVCache | None = None,
                  return_kv: bool = False):
  """One decoder layer: hidden [batch, seq, hidden] -> [batch, seq, hidden] (and, with
  `return_kv`, its keys / values `{"k", "v"}: [batch, kv_heads, seq, head_dim]`).

  layer_type: "full_attention" or "sliding_attention" (`cfg.layer_types[i]` for layer i);
  sparse: a mixture-of-experts MLP (`cfg.sparse_layer(i)`); kv_shared, per_layer_input,
  shared_kv: Gemma 4 (`cfg.kv_shared(i)`, the layer's slice of the per-layer inputs, its
  producer's keys / values; see DecoderLayer)."""
  return decoder_layer(cfg, LayerKind(layer_type, sparse, kv_shared)).apply(
      {"params": layer_params}, hidden, positions, attention_mask,
      per_layer_input=per_layer_input, shared_kv=shared_kv, return_kv=return_kv)


def decoder_layer(cfg: ModelConfig, kind: LayerKind | str | None = None,
                  param_dtype: Any = jnp.float32) -> DecoderLayer:
  """The DecoderLayer of a `LayerKind` (a bare layer type string: a dense layer of that type)."""
  if kind is None or isinstance(kind, str):
    kind = LayerKind(kind or FULL)
  return DecoderLayer(cfg, param_dtype, kind.attention, kind.sparse, kind.kv_shared)


def final_logits(params: Params, cfg: ModelConfig | None, hidden: jax.Array) -> jax.Array:
  """The last block's output [batch, seq, hidden] -> logits [batch, seq, vocab] float32."""
  cfg = _config(params, cfg)
  return CausalLM(cfg).apply(_vars(params), hidden, method=CausalLM.logits)


def layer_params(params: Params, i: int) -> Params:
  """The parameters of decoder layer `i`."""
  return params[f"layers_{i}"]


def _config(params: Any, cfg: ModelConfig | None) -> ModelConfig:
  if cfg is not None:
    return cfg
  carried = getattr(params, "config", None)
  if carried is None:
    raise ValueError("no model config: pass cfg=<ModelConfig>, or params from "
                     "gptq_jax.models.load_model (they carry their config)")
  return carried


__all__ = [
    "MLP", "DecoderLayer", "CausalLM", "Params", "ModelParams", "init_params", "init_kv_cache",
    "forward", "forward_with_cache", "embed", "embed_inputs", "block_forward", "final_logits",
    "layer_params", "default_positions", "decoder_layer", "LayerKind",
]

# The pre-families names.
LlamaMLP, LlamaDecoderLayer, LlamaForCausalLM = MLP, DecoderLayer, CausalLM
