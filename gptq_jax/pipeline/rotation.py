"""Rotate a decoder's residual stream by an orthogonal matrix before quantizing (QuaRot /
SpinQuant's R1, arXiv:2404.00456 / arXiv:2405.16406), keeping the architecture.

For a pre-norm decoder whose norms are RMSNorms, ``rms(x Q) = rms(x)`` for any orthogonal ``Q``, so
the model computes the same function when

1. each norm's scale is folded into the linears it feeds (``K <- diag(w) K`` for q/k/v, gate/up
   and the LM head) and the norm's weight is set to the identity (1);
2. the embedding is rotated (``E <- E Q``), every linear reading the residual stream is rotated on
   its input side (``K <- Q^T K``) and every linear writing to it on its output side (``K <- K Q``,
   bias ``b <- b Q``);
3. a tied embedding is untied: the LM head becomes ``Q^T diag(w_final) E^T`` while the input
   embedding is ``E Q``.

The result is a standard model of the same family (``tie_word_embeddings=False``) that our forward,
orbax, the Hugging Face export and transformers run unchanged: no online transform at inference
(GPTQModel's rotation needs one in its loader). Rotated weights have fewer outlier channels, which
is what low-bit grids need. Per-head norms after the projections (Qwen3's q/k norms) see unrotated
values and are untouched. Gemma 3's post-attention / post-feedforward norms act on a block's
output before the residual add, with a per-channel scale that does not commute with ``Q``: such
"sandwich" models are refused (and with them the ``(1 + w)`` norms only Gemma has).

``kind="hadamard"``: a randomized Hadamard matrix ``diag(signs) H / sqrt(n)``. ``n = 2^k`` uses
Sylvester's construction; other sizes are Kronecker products with Paley Hadamard matrices of order
``q + 1`` (``q`` a prime, ``q = 3 mod 4``: 576 = 12 * 12 * 4, 640 = 20 * 32); a size with no such
factorization uses a random orthogonal block for its odd factor. ``kind="random"``: a random
orthogonal matrix (QR of a Gaussian, signs fixed). Both are seeded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

KINDS = ("hadamard", "random")
_INPUT_SIDE = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"))
_OUTPUT_SIDE = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def _sylvester(n: int) -> np.ndarray:
  H = np.ones((1, 1))
  while H.shape[0] < n:
    H = np.block([[H, H], [H, -H]])
  return H


def _is_prime(q: int) -> bool:
  return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley(q: int) -> np.ndarray:
  """Hadamard matrix of order q + 1 (Paley I), q prime with q = 3 mod 4."""
  squares = {(i * i) % q for i in range(1, q)}
  chi = lambda a: 0 if a % q == 0 else (1 if a % q in squares else -1)  # noqa: E731
  Qm = np.array([[chi(j - i) for j in range(q)] for i in range(q)], np.float64)
  S = np.zeros((q + 1, q + 1))
  S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Qm
  return np.eye(q + 1) + S


def _hadamard_factors(n: int) -> list[int] | None:
  """Paley orders whose product times a power of two is n (None if there is none)."""
  if n & (n - 1) == 0:
    return []
  for p in range(4, n + 1, 4):
    if n % p == 0 and p & (p - 1) and _is_prime(p - 1) and (p - 1) % 4 == 3:
      rest = _hadamard_factors(n // p)
      if rest is not None:
        return [p] + rest
  return None


def _random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
  Qm, R = np.linalg.qr(rng.standard_normal((n, n)))
  return Qm * np.sign(np.diag(R))


def orthogonal_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> np.ndarray:
  """A seeded orthogonal ``[n, n]`` float64 matrix (``kind``: "hadamard" or "random")."""
  if kind not in KINDS:
    raise ValueError(f"rotation kind {kind!r} is not one of {KINDS}")
  rng = np.random.default_rng(seed)
  if kind == "random":
    return _random_orthogonal(n, rng)
  factors = _hadamard_factors(n)
  if factors is None:  # e.g. 896 = 7 * 128: a random orthogonal block for the odd factor
    two = n & -n
    M = np.kron(_random_orthogonal(n // two, rng), _sylvester(two) / np.sqrt(two))
  else:
    M = np.ones((1, 1))
    for p in factors:
      M = np.kron(M, _paley(p - 1))
    two = n // M.shape[0]
    M = np.kron(M, _sylvester(two)) / np.sqrt(n)
  return rng.choice([-1.0, 1.0], size=n)[:, None] * M


def _norm_scale(norm_params) -> np.ndarray:
  return np.asarray(norm_params["weight"], np.float64)


def _identity_norm(norm_params):
  return {**norm_params, "weight": np.ones_like(np.asarray(norm_params["weight"]))}


def _cast(a: np.ndarray, like) -> np.ndarray:
  dtype = getattr(like, "dtype", None)
  return np.asarray(a, dtype=np.asarray(like).dtype if dtype is None else np.dtype(dtype))


def rotate_model(config: Any, params: Any, kind: str = "hadamard", seed: int = 0):
  """``(config', params')``: the same function with the residual stream rotated (module doc).

  ``params`` are float (unquantized) params of the built-in decoder; ``config'`` has
  ``tie_word_embeddings=False``. Raises for decoders whose norms cannot be folded (Gemma 3's
  sandwich norms) and for already quantized params. The pieces (``rotate_block``,
  ``rotate_embedding``, ``rotate_head``) also serve a model streamed block by block
  (``gptq_jax/cli/source.py``): each reads only its own tensors (and the final norm's scale).
  """
  check_rotatable(config)
  Q64 = orthogonal_matrix(config.hidden_size, kind, seed)
  out = dict(params)
  E = np.asarray(params["embed_tokens"]["embedding"])
  out["embed_tokens"] = {**params["embed_tokens"], "embedding": rotate_embedding(E, Q64)}
  for i in range(config.num_hidden_layers):
    out[f"layers_{i}"] = rotate_block(params[f"layers_{i}"], Q64, f"layers_{i}")
  w_final = _norm_scale(params["norm"])
  out["norm"] = _identity_norm(params["norm"])
  if config.tie_word_embeddings:
    head, like = E.T, E  # [hidden, vocab]
  else:
    head = like = params["lm_head"]["kernel"]
  out["lm_head"] = {**params.get("lm_head", {}), "kernel": rotate_head(head, Q64, w_final, like)}
  new_config = dataclasses.replace(config, tie_word_embeddings=False)
  out = {k: _to_jax(v) for k, v in out.items()}
  return new_config, _rewrap(params, out, new_config)


def check_rotatable(config: Any) -> None:
  """Raise for decoders whose norms cannot be folded into the linears (Gemma 3)."""
  if getattr(config, "sandwich_norms", False) or getattr(config, "norm_unit_offset", False):
    raise ValueError(f"rotation is not supported for model_type="
                     f"{getattr(config, 'model_type', '?')!r}: its post-attention and "
                     "post-feedforward norms scale the block's output per channel before the "
                     "residual add (and its norms scale by 1 + w), which no rotation of the "
                     "residual stream commutes with")


def rotate_embedding(E: np.ndarray, Q64: np.ndarray) -> np.ndarray:
  """Embedding rows ``[n, hidden]`` (all of them or any subset) -> ``E Q``, in ``E``'s dtype.
  float32 products: the embedding is large (BLAS sgemm)."""
  E = np.asarray(E)
  return _cast(E.astype(np.float32) @ Q64.astype(np.float32), E)


def rotate_head(head: Any, Q64: np.ndarray, w_final: np.ndarray, like: Any = None) -> np.ndarray:
  """Output-projection columns ``[hidden, n]`` (all of them or any subset; a tied embedding's
  ``E^T``) -> ``Q^T diag(w_final) head``, in ``like``'s dtype (default ``head``'s); float32
  products."""
  Qw = (Q64.T * np.asarray(w_final, np.float64)[None, :]).astype(np.float32)
  return _cast(Qw @ np.asarray(head, np.float32), head if like is None else like)


def final_norm_scale(norm_params: Any, config: Any) -> np.ndarray:
  """The final norm's per-channel scale (what ``rotate_head`` folds into the head)."""
  return _norm_scale(norm_params)


def identity_norm(norm_params: Any, config: Any) -> dict:
  """A norm's params with its scale set to the identity (the scale is folded elsewhere)."""
  return _identity_norm(norm_params)


# float64 products a slab at a time (about this many bytes of float64 per slab): a streamed
# block's transients stay small next to its own size (a 2048 x 5632 kernel is 88 MiB in float64)
_SLAB_BYTES = 16 << 20


def _rotate_in(K: Any, Q64: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """``Q^T diag(scale) K`` for an input-side kernel ``[hidden, out]``, in ``K``'s dtype, computed
  in float64 over slabs of columns."""
  K = np.asarray(K)
  out = np.empty(K.shape, K.dtype)
  step = max(1, _SLAB_BYTES // (8 * K.shape[0]))
  for lo in range(0, K.shape[1], step):
    out[:, lo:lo + step] = Q64.T @ (scale[:, None] * np.asarray(K[:, lo:lo + step], np.float64))
  return out


def _rotate_out(K: Any, Q64: np.ndarray) -> np.ndarray:
  """``K Q`` for an output-side kernel ``[in, hidden]`` (or a bias ``[hidden]``), in ``K``'s
  dtype, computed in float64 over slabs of rows."""
  K = np.asarray(K)
  if K.ndim == 1:
    return _cast(np.asarray(K, np.float64) @ Q64, K)
  out = np.empty(K.shape, K.dtype)
  step = max(1, _SLAB_BYTES // (8 * K.shape[1]))
  for lo in range(0, K.shape[0], step):
    out[lo:lo + step] = np.asarray(K[lo:lo + step], np.float64) @ Q64
  return out


def rotate_block(block: Any, Q64: np.ndarray, where: str = "block",
                 put: Any = lambda x: x) -> dict:
  """One float decoder block with its norms folded and the residual stream rotated (module doc:
  steps 1 and 2); each array keeps its dtype. Each rotated array goes through ``put`` as soon
  as it is made (a streamed read sends it to the device there, holding one at a time on the
  host); the arrays not rotated are returned as they are."""
  new = dict(block)
  scales = {"self_attn": _norm_scale(block["input_layernorm"]),
            "mlp": _norm_scale(block["post_attention_layernorm"])}
  for name in ("input_layernorm", "post_attention_layernorm"):
    new[name] = _identity_norm(block[name])
  subs = {k: dict(block[k]) for k in ("self_attn", "mlp")}
  for a, b in _INPUT_SIDE:
    lin = block[a][b]
    K = lin["kernel"]
    if not hasattr(K, "shape") or np.asarray(K).ndim != 2:
      raise ValueError(f"{where}.{a}.{b} is not a float kernel: rotate before quantizing")
    subs[a][b] = {**lin, "kernel": put(_rotate_in(K, Q64, scales[a]))}
  for a, b in _OUTPUT_SIDE:
    lin = block[a][b]
    rot = {"kernel": put(_rotate_out(lin["kernel"], Q64))}
    if lin.get("bias") is not None:
      rot["bias"] = put(_rotate_out(lin["bias"], Q64))
    subs[a][b] = {**lin, **rot}
  new.update(subs)
  return new


def _to_jax(tree):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  return jax.tree.map(jnp.asarray, tree)


def _rewrap(params, out: dict, config):
  """Keep the params' container type (a ModelParams carrying its config, where there is one)."""
  if type(params) is dict:
    return out
  try:
    return type(params)(out, config=config)
  except TypeError:
    return out


def check_rotated(params: Any, config: Any, applied: str | None = None,
                  kind: str | None = None) -> None:
  """Raise unless the model is rotated: the first block's norms are identities (``rotate_model``
  was applied), or, when ``params`` hold no blocks (a model streamed from disk), the adapter
  rotates each block as it reads it (``applied``: its rotation kind, equal to ``kind``). A
  config asking for a rotation must not quantize an unrotated model silently."""
  if "layers_0" not in params:  # the blocks are read on demand: the adapter says what it applies
    if applied is not None and applied != "none" and (kind is None or applied == kind):
      return
    raise ValueError(f"GPTQConfig.rotation is {kind!r} but the blocks are read by the adapter, "
                     f"which applies rotation {applied!r}: open the streamed model with the same "
                     "rotation (gptq_jax.cli.source.ModelSource(..., rotation=...))")
  w = np.asarray(params["layers_0"]["input_layernorm"]["weight"], np.float64)
  if not np.all(w == 1.0):
    raise ValueError("GPTQConfig.rotation is set but the model is not rotated: call "
                     "gptq_jax.pipeline.rotation.rotate_model(config, params, cfg.rotation, "
                     "seed=cfg.seed) first (the CLI does) and quantize the params it returns")
