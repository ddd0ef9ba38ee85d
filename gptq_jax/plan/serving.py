"""Serving at the roofline: one decode step of the packed model against the same model in bf16.

Compiles the per-layer decode path of generation (``models/layer_loop.py``: ``embed_token``, one
``decode_layer`` per layer kind, ``decode_head``) for one chip, with the decoder's kernels packed
(``PreparedWeight``, the TPU kernel chosen at lowering) or dense bfloat16, a KV cache of ``cache``
slots, at batch 1 / 8 / 64. A step's time at the roofline is the sum over the model's layers and
the head of max(FLOPs / peak, bytes / bandwidth) from the compiler's cost analysis; tokens per
second per chip = batch / step time. The model spread over several chips at the same per-chip
roofline gives the same tokens per second per chip (collectives not counted).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptq_jax.config import GPTQConfig
from gptq_jax.kernels.prepare import PreparedWeight
from gptq_jax.models import layer_loop
from gptq_jax.models.config import ModelConfig
from gptq_jax.models.families import layer_tensor_specs, nonlayer_tensor_specs
from gptq_jax.plan.chips import Chip
from gptq_jax.plan.measure import measure, nbytes

S = jax.ShapeDtypeStruct
BATCHES = (1, 8, 64)


def _params(specs, packed: GPTQConfig | None, sharding) -> dict:
  bf16 = jnp.bfloat16
  out: dict = {}
  for path, _, shape in specs:
    shape = tuple(shape[::-1]) if path[-1] == "kernel" else tuple(shape)
    leaf = S(shape, bf16, sharding=sharding)
    if path[-1] == "kernel" and packed is not None:
      k, n = shape
      groups = 1 if packed.group_size == -1 else -(-k // packed.group_size)
      leaf = PreparedWeight(
          qweight=S((k * packed.bits // 32, n), jnp.int32, sharding=sharding),
          scales=S((groups, n), bf16, sharding=sharding), zeros=S((groups, n), bf16,
                                                                   sharding=sharding),
          perm=S((k,), jnp.int32, sharding=sharding) if packed.desc_act else None,
          bits=packed.bits, group_size=packed.group_size)
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


def decode_step(model: ModelConfig, packed: GPTQConfig | None, chip: Chip, device, batch: int,
                cache: int) -> dict:
  """Seconds per step at the roofline, tokens/s per chip, weight bytes, for one batch size."""
  sh = jax.sharding.SingleDeviceSharding(device)
  cfg = model.replace(dtype="bfloat16", backend="auto")
  b, bf16, i32 = batch, jnp.bfloat16, jnp.int32
  rest = _params(nonlayer_tensor_specs(cfg), None, sh)
  seconds, weights = 0.0, nbytes(rest)
  token = S((b,), i32, sharding=sh)
  progs = [measure("embed token", "serving", layer_loop.embed_token, (cfg, rest, token))]
  hidden = S((b, 1, cfg.hidden_size), bf16, sharding=sh)
  progs.append(measure("head", "serving", layer_loop.decode_head,
                       (cfg, rest, hidden, S((b,), jnp.bool_, sharding=sh),
                        jax.eval_shape(lambda: jax.random.key(0)), 0.0, 0, 1.0,
                        S((1,), i32, sharding=sh), S((), i32, sharding=sh))))
  kv = S((b, cfg.num_key_value_heads, cache, cfg.head_dim), bf16, sharding=sh)
  for kind in dict.fromkeys(cfg.layer_kinds):  # as models/decode.py passes them
    i = cfg.layer_kinds.index(kind)
    count = cfg.layer_kinds.count(kind)
    lp = _params(layer_tensor_specs(cfg, i), packed, sh)
    weights += count * nbytes(lp)
    args = (cfg, kind, lp, {"k": kv, "v": kv}, hidden, token, S((b, cache), i32, sharding=sh),
            S((), i32, sharding=sh), {})
    progs.append(measure(f"decode layer ({kind.attention})", "serving", layer_loop.decode_layer,
                         args, calls=count))
  seconds = sum(p.seconds(chip) for p in progs)
  return {"batch": b, "step_seconds": seconds, "tokens_per_s_per_chip": b / seconds,
          "weight_bytes": weights, "kv_cache_bytes": 2 * cfg.num_hidden_layers * nbytes(kv),
          "programs": [p.to_dict() for p in progs]}


def serving(model: ModelConfig, cfg: GPTQConfig, chip: Chip, device, cache: int) -> list[dict]:
  """Per batch size: the packed model's decode step against bf16."""
  out = []
  for b in BATCHES:
    q = decode_step(model, cfg, chip, device, b, cache)
    f = decode_step(model, None, chip, device, b, cache)
    out.append({"batch": b, "packed": q, "bf16": f,
                "speedup": q["tokens_per_s_per_chip"] / f["tokens_per_s_per_chip"]})
  return out
