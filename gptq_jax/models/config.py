"""ModelConfig: the architecture of a decoder of any supported family, as typed fields.

One decoder serves Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3 and Gemma 4 (text): every difference
between them is a field here (biases, q/k norms, sliding-window layers, Gemma's norms and embedding
scale, the MLP activation, the attention scale, RoPE per layer type, and Gemma 4's per-layer
inputs, per-type head sizes and shared K/V, delimited below). The mapping to and from a Hugging
Face config.json lives in `families.py`; `ModelConfig.from_hf_dict` / `.to_hf_dict` call it.

Frozen and hashable, so it can be a static argument of `jax.jit`. Validated at construction: every
error names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gptq_jax.config import BACKENDS
from gptq_jax.kernels.grouped import IMPLS as MOE_IMPLS
from gptq_jax.models import families
from gptq_jax.models.config_fields import (  # noqa: F401 (ROPE_TYPES, FULL: re-exported)
    FULL, LAYER_TYPES, ROPE_TYPES, SLIDING, LayerKind, RopeScaling, _fail)

COMPUTE_DTYPES = ("float32", "bfloat16")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma4_text",
                         "qwen3_moe", "qwen2_moe", "mixtral")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
# How a mixture-of-experts block picks each token's experts (models/moe.py): "softmax_topk" is
# softmax over the router logits in float32, then the top-k probabilities (renormalized to sum 1
# with norm_topk_prob) weight the chosen experts (Qwen3-MoE, Qwen2-MoE, Mixtral); "gemma4" first
# scales the router's input (a scale-free RMSNorm, a learned per-channel scale, hidden ** -0.5)
# and multiplies each chosen weight by its expert's learned scale (moe.ScaledRouter).
ROUTERS = ("softmax_topk", "gemma4")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A decoder. `dtype` is the compute dtype (not saved to config.json); params stay as loaded.

  The family fields (defaults = Llama):
    model_type: the HF family (one of SUPPORTED_MODEL_TYPES).
    attention_bias: biases on q, k, v and o (Llama / Qwen3 / Gemma 3 `attention_bias`).
    qkv_bias, o_bias: per-projection biases; None = `attention_bias` (Qwen2: q/k/v only).
    qk_norm: a per-head RMSNorm (`self_attn.q_norm` / `k_norm`, weight [head_dim]) on q and k,
      before RoPE (Qwen3, Gemma 3).
    norm_unit_offset: RMSNorms scale by (1 + weight), in float32 (Gemma).
    scale_embeddings: the embedding output is multiplied by sqrt(hidden_size), in the compute
      dtype (Gemma).
    sandwich_norms: four norms per block: input / post_attention (on the attention output) /
      pre_feedforward / post_feedforward (on the MLP output) (Gemma 3).
    hidden_act: the gated MLP's activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU).
    query_pre_attn_scalar: attention scores are scaled by its -1/2 power; None = head_dim.
    layer_types: per layer, "full_attention" or "sliding_attention"; None = all full.
    sliding_window: keys within this many slots of the query (itself included) on sliding layers.
    rope_local_theta, rope_local_scaling: RoPE of sliding layers when rope_local_theta is set
      (Gemma 3's local base); otherwise every layer uses rope_theta / rope_scaling.
    attn_logit_softcapping, final_logit_softcapping: tanh soft caps (None = off).

  Mixture of experts (0 experts = a dense model; models/moe.py):
    num_experts, num_experts_per_tok: experts per sparse layer, and how many each token uses.
    moe_intermediate_size: each expert's MLP width (None: intermediate_size, as Mixtral; the
      dense-only layers of a sparse model use intermediate_size).
    norm_topk_prob: the chosen experts' probabilities are renormalized to sum to 1.
    router: how experts are picked, one of ROUTERS.
    shared_expert_intermediate_size: a dense MLP of this width beside the experts (0: none), its
      output times sigmoid(shared_expert_gate(x)) when shared_expert_gate (Qwen2-MoE).
    decoder_sparse_step, mlp_only_layers: layer i is sparse when (i + 1) % decoder_sparse_step ==
      0 and i is not in mlp_only_layers (dense-only layers).
  Gemma 4 (text) fields, all off by default (models/gemma4.py holds their machinery):
    norm_float_scale: RMSNorms multiply by `weight` in float32, then cast (Gemma 4's plain-weight
      norms; without it the normalized input is cast first, as Llama's).
    value_norm: a scale-free RMSNorm over head_dim on the values.
    layer_scalar: each block's output is multiplied by its learned `layer_scalar` [1].
    global_head_dim, global_num_key_value_heads: head_dim and key/value heads of the
      full-attention layers (None: those of the sliding ones, `head_dim` / `num_key_value_heads`).
    attention_k_eq_v: full-attention layers have no v_proj; the values are the k projection's
      output (before k_norm and RoPE).
    num_kv_shared_layers: the last N layers compute no keys / values: each attends over those of
      the last earlier (non-shared) layer of its own type (its "K/V producer").
    use_double_wide_mlp: the K/V-sharing layers' MLPs are 2 x intermediate_size wide.
    hidden_size_per_layer_input: P > 0 gives every block a per-layer input [batch, seq, P] (from
      the token ids and the embedding, see models/gemma4.py) mixed in after the MLP; 0 = none.
    vocab_size_per_layer_input: rows of the per-layer input table (None: vocab_size).
    dense_mlp_beside_experts: a sparse layer keeps its dense MLP, and adds the experts' output
      to it (each with its own norms; the router reads the attention residual): Gemma 4's MoE
      layers (models/gemma4.py, router "gemma4").
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None
  model_type: str = "llama"
  qkv_bias: bool | None = None
  o_bias: bool | None = None
  qk_norm: bool = False
  norm_unit_offset: bool = False
  scale_embeddings: bool = False
  sandwich_norms: bool = False
  query_pre_attn_scalar: float | None = None
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  rope_local_theta: float | None = None
  rope_local_scaling: RopeScaling | None = None
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int | None = None
  norm_topk_prob: bool = False
  router: str = "softmax_topk"
  shared_expert_intermediate_size: int = 0
  shared_expert_gate: bool = False
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  # ----- Gemma 4 (gemma4_text) -----
  norm_float_scale: bool = False
  value_norm: bool = False
  layer_scalar: bool = False
  global_head_dim: int | None = None
  global_num_key_value_heads: int | None = None
  attention_k_eq_v: bool = False
  num_kv_shared_layers: int = 0
  use_double_wide_mlp: bool = False
  hidden_size_per_layer_input: int = 0
  vocab_size_per_layer_input: int | None = None
  dense_mlp_beside_experts: bool = False
  # ----- end Gemma 4 -----
  dtype: str = "float32"
  # How packed (GPTQ) linears run: one of gptq_jax.config.BACKENDS. Not saved to config.json.
  backend: str = "auto"
  # How the experts' grouped matmuls run: one of kernels/grouped.py's IMPLS. Not saved.
  moe_impl: str = "auto"

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(name, value, "a positive int")
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      _fail("model_type", self.model_type, f"one of {SUPPORTED_MODEL_TYPES}")
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    kv = self.num_key_value_heads
    if not isinstance(kv, int) or kv <= 0 or self.num_attention_heads % kv:
      _fail("num_key_value_heads", kv,
            f"a positive divisor of num_attention_heads={self.num_attention_heads}")
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        _fail("hidden_size", self.hidden_size,
              f"a multiple of num_attention_heads={self.num_attention_heads} (or set head_dim)")
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
      _fail("head_dim", self.head_dim, "a positive even int (rotary pairs)")
    if not self.rms_norm_eps > 0:
      _fail("rms_norm_eps", self.rms_norm_eps, "a positive float")
    if not self.rope_theta > 0:
      _fail("rope_theta", self.rope_theta, "a positive float")
    for name in ("rope_scaling", "rope_local_scaling"):
      value = getattr(self, name)
      if isinstance(value, Mapping):
        set_(name, RopeScaling.from_hf_dict(value, self.max_position_embeddings))
      if getattr(self, name) is not None and not isinstance(getattr(self, name), RopeScaling):
        _fail(name, value, "None, a RopeScaling or an HF rope_scaling dict")
    if self.rope_local_theta is not None and not self.rope_local_theta > 0:
      _fail("rope_local_theta", self.rope_local_theta, "None or a positive float")
    if self.hidden_act not in HIDDEN_ACTS:
      _fail("hidden_act", self.hidden_act, f"one of {HIDDEN_ACTS} (the gated MLP's activation)")
    for name in ("qkv_bias", "o_bias"):
      if getattr(self, name) is None:
        set_(name, bool(self.attention_bias))
    if self.query_pre_attn_scalar is not None and not self.query_pre_attn_scalar > 0:
      _fail("query_pre_attn_scalar", self.query_pre_attn_scalar, "None or a positive number")
    if self.sliding_window is not None and (
        not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool)
        or self.sliding_window <= 0):
      _fail("sliding_window", self.sliding_window, "None or a positive int")
    if self.layer_types is None:
      set_("layer_types", (FULL,) * self.num_hidden_layers)
    set_("layer_types", tuple(self.layer_types))
    if len(self.layer_types) != self.num_hidden_layers or any(
        t not in LAYER_TYPES for t in self.layer_types):
      _fail("layer_types", self.layer_types,
            f"{self.num_hidden_layers} entries, each one of {LAYER_TYPES}")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
      value = getattr(self, name)
      if value is not None and not value > 0:
        _fail(name, value, "None or a positive number")
    self._check_gemma4()
    if isinstance(self.eos_token_id, (list, tuple)):
      set_("eos_token_id", tuple(int(i) for i in self.eos_token_id))
    self._check_moe()
    if self.dtype not in COMPUTE_DTYPES:
      _fail("dtype", self.dtype, f"one of {COMPUTE_DTYPES}")
    if self.backend not in BACKENDS:
      _fail("backend", self.backend, f"one of {BACKENDS}")

  def _check_moe(self) -> None:
    minimum = dict(num_experts=0, num_experts_per_tok=0, shared_expert_intermediate_size=0,
                   decoder_sparse_step=1)
    for name, least in minimum.items():
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        _fail(name, value, f"an int >= {least}")
    object.__setattr__(self, "mlp_only_layers", tuple(sorted(int(i) for i in self.mlp_only_layers)))
    if not self.num_experts:
      return
    if not 0 < self.num_experts_per_tok <= self.num_experts:
      _fail("num_experts_per_tok", self.num_experts_per_tok,
            f"an int in [1, num_experts={self.num_experts}]")
    if self.moe_intermediate_size is not None and (
        not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0):
      _fail("moe_intermediate_size", self.moe_intermediate_size, "None or a positive int")
    if self.moe_impl not in MOE_IMPLS:
      _fail("moe_impl", self.moe_impl, f"one of {MOE_IMPLS}")
    if self.router not in ROUTERS:
      _fail("router", self.router, f"one of {ROUTERS}")
    if self.shared_expert_gate and not self.shared_expert_intermediate_size:
      _fail("shared_expert_gate", True, "False without a shared expert")
    if any(not 0 <= i < self.num_hidden_layers for i in self.mlp_only_layers):
      _fail("mlp_only_layers", self.mlp_only_layers,
            f"layer indices in [0, {self.num_hidden_layers})")

  def sparse_layer(self, i: int) -> bool:
    """Whether layer i's MLP is a mixture of experts."""
    return bool(self.num_experts) and (i + 1) % self.decoder_sparse_step == 0 and (
        i not in self.mlp_only_layers)

  @property
  def expert_intermediate_size(self) -> int:
    return self.moe_intermediate_size or self.intermediate_size

  @property
  def layer_kinds(self) -> tuple[LayerKind, ...]:
    """Each layer's `LayerKind` (attention type, sparse MLP, shared K/V)."""
    return tuple(LayerKind(t, self.sparse_layer(i), self.kv_shared(i))
                 for i, t in enumerate(self.layer_types))

  # ----- Gemma 4 (gemma4_text): validation and per-layer shapes -----

  def _check_gemma4(self) -> None:
    def count(name: str, value: Any, minimum: int) -> None:
      if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(name, value, f"an int >= {minimum}")

    if self.global_head_dim is not None:
      count("global_head_dim", self.global_head_dim, 2)
      if self.global_head_dim % 2:
        _fail("global_head_dim", self.global_head_dim, "None or a positive even int")
    kv = self.global_num_key_value_heads
    if kv is not None and (not isinstance(kv, int) or kv <= 0 or self.num_attention_heads % kv):
      _fail("global_num_key_value_heads", kv,
            f"None or a positive divisor of num_attention_heads={self.num_attention_heads}")
    count("hidden_size_per_layer_input", self.hidden_size_per_layer_input, 0)
    for name, base in (("global_head_dim", self.head_dim),
                       ("global_num_key_value_heads", self.num_key_value_heads)):
      if getattr(self, name) == base:  # the same as the sliding layers': no override
        object.__setattr__(self, name, None)
    if self.vocab_size_per_layer_input is None:
      object.__setattr__(self, "vocab_size_per_layer_input", self.vocab_size)
    count("vocab_size_per_layer_input", self.vocab_size_per_layer_input, 1)
    n, shared = self.num_hidden_layers, self.num_kv_shared_layers
    count("num_kv_shared_layers", shared, 0)
    if shared >= n:
      _fail("num_kv_shared_layers", shared, f"fewer than num_hidden_layers={n} (a layer that "
            "shares keys / values needs an earlier one of its type that computes them)")
    if self.dense_mlp_beside_experts and not self.num_experts:
      _fail("dense_mlp_beside_experts", True, "False without experts (num_experts=0)")
    missing = sorted(set(self.layer_types[n - shared:]) - set(self.layer_types[:n - shared]))
    if missing:
      _fail("num_kv_shared_layers", shared, f"a value whose shared layers' types {missing} also "
            f"occur among the first {n - shared} layers (their K/V producers)")

  def layer_head_dim(self, layer_type: str) -> int:
    """head_dim of a layer of this type (Gemma 4's full-attention layers may differ)."""
    return self.global_head_dim if layer_type == FULL and self.global_head_dim else self.head_dim

  def layer_kv_heads(self, layer_type: str) -> int:
    """Key / value heads of a layer of this type."""
    if layer_type == FULL and self.global_num_key_value_heads:
      return self.global_num_key_value_heads
    return self.num_key_value_heads

  def layer_has_v_proj(self, layer_type: str) -> bool:
    """False on Gemma 4's full-attention layers with attention_k_eq_v (values = keys' projection)."""
    return not (self.attention_k_eq_v and layer_type == FULL)

  def kv_shared(self, i: int) -> bool:
    """Layer i reads another layer's keys / values (one of the last num_kv_shared_layers)."""
    return i >= self.num_hidden_layers - self.num_kv_shared_layers

  def kv_producer(self, i: int) -> int | None:
    """The layer whose keys / values layer i attends over (None: its own): the last layer of
    its type before the shared ones."""
    if not self.kv_shared(i):
      return None
    first = self.num_hidden_layers - self.num_kv_shared_layers
    return max(j for j in range(first) if self.layer_types[j] == self.layer_types[i])

  @property
  def kv_producers(self) -> dict[str, int]:
    """{layer type: producer layer} of the layers whose K/V later layers read (empty: none)."""
    return {self.layer_types[i]: self.kv_producer(i) for i in range(self.num_hidden_layers)
            if self.kv_shared(i)}

  def layer_intermediate_size(self, kv_shared: bool) -> int:
    """The MLP width of a layer (Gemma 4's double-wide MLP on the K/V-sharing layers)."""
    return self.intermediate_size * (2 if kv_shared and self.use_double_wide_mlp else 1)

  @property
  def uniform_layers(self) -> bool:
    """Every layer has the same parameter shapes and reads only its own inputs (what the
    scanned decode stacks); False with Gemma 4's per-layer inputs, shared K/V or per-type heads."""
    return not (self.hidden_size_per_layer_input or self.num_kv_shared_layers or (
        len(self.distinct_layer_types) > 1 and (
            self.layer_head_dim(FULL) != self.layer_head_dim(SLIDING)
            or self.layer_kv_heads(FULL) != self.layer_kv_heads(SLIDING)
            or self.layer_has_v_proj(FULL) != self.layer_has_v_proj(SLIDING))))

  # ----- end Gemma 4 -----

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

  @property
  def attention_scale(self) -> float:
    """The factor on q.k: query_pre_attn_scalar ** -0.5 (head_dim ** -0.5 by default)."""
    return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def window(self, layer_type: str) -> int | None:
    """The sliding window of a layer of this type (None: full causal attention)."""
    return self.sliding_window if layer_type == SLIDING else None

  def rope(self, layer_type: str) -> tuple[float, RopeScaling | None]:
    """(base, scaling) of the rotary embedding of a layer of this type."""
    if layer_type == SLIDING and self.rope_local_theta is not None:
      return self.rope_local_theta, self.rope_local_scaling
    return self.rope_theta, self.rope_scaling

  @property
  def distinct_layer_types(self) -> tuple[str, ...]:
    """The layer types present, in LAYER_TYPES order (one compiled program per type)."""
    return tuple(t for t in LAYER_TYPES if t in self.layer_types)

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
    """Reads a Hugging Face config.json dict of a supported family (transformers 4 `rope_scaling`
    or 5 `rope_parameters`); an unsupported model_type raises a ValueError listing the families."""
    return families.config_from_hf(cls, d)

  def to_hf_dict(self) -> dict[str, Any]:
    """A config.json dict that transformers (4 and 5) and vLLM read as this family's CausalLM."""
    return families.config_to_hf(self)


LlamaConfig = ModelConfig  # the pre-families name
