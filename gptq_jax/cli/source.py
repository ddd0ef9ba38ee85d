"""The model the streamed CLI quantizes, read from its files a piece at a time (docs/scale.md).

``ModelSource(spec, rotation=, seed=)`` opens an HF folder, a GGUF file or an embedded name
lazily: ``block(i)`` reads block ``i``'s tensors (the memory maps are closed right after, so no
page stays resident); the embedding and the output projection are never read whole:
``embedding_rows(ids)`` gathers the rows of the tokens the windows use, ``head_columns(lo, hi)``
reads a slice of the output projection (the tied embedding's rows for a tied model), and
``vocab_chunks()`` cuts the vocabulary into slices of about ``ROW_CHUNK_BYTES``.

With a rotation (``--rotation hadamard|random``, pipeline/rotation.py) every piece is rotated as
it is read: each block's norms are folded into the linears they feed and the residual stream is
rotated (``rotate_block``), the embedding rows are ``E Q``, the output projection is
``Q^T diag(w_final) head`` (a tied embedding is untied: ``config`` says
``tie_word_embeddings=False``) and the final norm is the identity. Each piece equals the same
piece of ``rotate_model`` (same kind and seed) on the whole model, which is never built: no copy
of the model in memory or on disk.

``digest()`` is the resume fingerprint of what is read: sizes, the safetensors headers and a few
evenly spaced samples of each file's bytes (not every tensor), and the rotation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gptq_jax.models import hf as hf_lib
from gptq_jax.models.hf import to_device  # stream.py also calls it as source.to_device
from gptq_jax.pipeline import rotation as rot

_SAMPLES, _SAMPLE_BYTES = 16, 4096  # bytes sampled per weight file for the fingerprint
ROW_CHUNK_BYTES = 64 << 20  # float32 bytes of one slice of the embedding / output projection
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class ModelSource:
  """A model read lazily from its files (module doc), optionally rotated on read."""

  def __init__(self, spec: str, rotation: str = "none", seed: int = 0):
    from gptq_jax.models import GGUFCheckpoint, HFCheckpoint, resolve_model_spec

    self.kind, self.path = resolve_model_spec(spec)
    self.ckpt = HFCheckpoint(self.path) if self.kind == "hf" else GGUFCheckpoint(self.path)
    self.file_config = self.config = self.ckpt.config  # file_config: how the files are laid out
    self.rotation, self.seed = rotation, seed
    self._q = self._w_final = None
    if rotation != "none":
      rot.check_rotatable(self.file_config)  # Gemma 3: refused here, before any work
      self._q = rot.orthogonal_matrix(self.file_config.hidden_size, rotation, seed)
      self.config = self.file_config.replace(tie_word_embeddings=False)

  @property
  def files(self) -> list[str]:
    """Every file the weights are read from (config.json first for a folder)."""
    if self.kind == "gguf":
      return [self.path]
    weights = sorted(set(getattr(self.ckpt, "_where", {}).values()))
    return [os.path.join(self.path, "config.json"), *weights]

  def digest(self) -> str:
    """The weights' fingerprint (``source_digest``) and the rotation applied on read."""
    rotation = "" if self._q is None else f"|rotation {self.rotation} seed {self.seed}"
    return source_digest(self.files) + rotation

  def native_dtype(self) -> str:
    """The checkpoint's own float dtype as a ``--dtype`` choice: bfloat16 for a bf16 folder,
    float32 otherwise (float16 calibration overflows; GGUF tensors dequantize to float32)."""
    if self.kind != "hf":
      return "float32"
    with open(os.path.join(self.path, "config.json")) as f:
      raw = json.load(f)
    name = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
    return "bfloat16" if "bfloat16" in name else "float32"

  def float_bytes(self, dtype: str = "float32") -> int:
    """Bytes of the whole float model in ``dtype`` (what it would take to hold it)."""
    cfg, n = self.config, 0
    specs = list(hf_lib.nonlayer_tensor_specs(cfg))
    for i in range(cfg.num_hidden_layers):
      specs += list(hf_lib.layer_tensor_specs(cfg, i))
      specs += [(e.path, e.fused_name, (len(e.names),) + e.shape)  # a sparse block's experts
                for e in hf_lib.layer_expert_specs(cfg, i)]
    for _, _, shape in specs:
      n += math.prod(shape)
    return n * jnp.dtype(dtype).itemsize

  def _read(self, specs, dtype, host: bool = False) -> dict:
    try:
      return hf_lib.params_from_tensors(specs, self.ckpt.get, dtype, host=host)
    finally:
      self.close()  # drop the memory maps: no page of the file stays resident

  # ----- the blocks ---------------------------------------------------------------------------

  def block(self, i: int, dtype: Any) -> dict:
    """Decoder block i (a sparse block's experts stacked, from per-expert or fused tensors)."""
    if self._q is None:
      try:
        has = getattr(self.ckpt, "has", lambda name: True)
        return hf_lib.layer_from_tensors(self.file_config, i, self.ckpt.get, has, dtype)
      finally:
        self.close()
    specs = hf_lib.layer_tensor_specs(self.file_config, i)  # rotation: dense models only
    block = self._read(specs, jnp.float32, host=True)  # float32 host views of the files
    # each rotated kernel goes to the device when made; the rest (norms) after
    rotated = rot.rotate_block(block, self._q, f"layers_{i}", lambda x: to_device(x, dtype))
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else to_device(x, dtype), rotated)

  # ----- the embedding, the final norm and the output projection, a slice at a time ------------

  def _rows(self, name: str, lo: int, hi: int) -> np.ndarray:
    try:
      return np.asarray(self.ckpt.rows(name, lo, hi), np.float32)
    finally:
      self.close()

  def vocab_chunks(self) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` covering the vocabulary, each about ``ROW_CHUNK_BYTES`` in float32 and
    a multiple of 32 rows (so a packed head splits at the same bounds, any bit width)."""
    v = self.config.vocab_size
    step = max(32, ROW_CHUNK_BYTES // (4 * self.config.hidden_size) // 32 * 32)
    return [(lo, min(v, lo + step)) for lo in range(0, v, step)]

  def other_tables(self, skip: tuple[str, ...] = ()) -> list[str]:
    """The top-level non-block params other than the embedding, the output projection and the
    final norm (Gemma 4's per-layer input tables), minus ``skip``."""
    keys = {spec[0][0] for spec in hf_lib.nonlayer_tensor_specs(self.file_config)}
    return sorted(keys - {"embed_tokens", "lm_head", "norm"} - set(skip))

  def tables(self, dtype: Any, keys: tuple[str, ...]) -> dict:
    """The top-level non-block params ``keys`` whole, on the device in ``dtype`` (Gemma 4's
    per-layer input tables, which the embedding rows alone do not give)."""
    specs = [s for s in hf_lib.nonlayer_tensor_specs(self.file_config) if s[0][0] in keys]
    return self._read(specs, dtype)

  def embedding_rows(self, ids: Any) -> np.ndarray:
    """float32 ``[len(ids), hidden]``: the (rotated) embedding's rows of ``ids``, read a slice of
    the vocabulary at a time and only where some id falls."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    out = np.empty((ids.size, self.config.hidden_size), np.float32)
    for lo, hi in self.vocab_chunks():
      sel = np.nonzero((ids >= lo) & (ids < hi))[0]
      if sel.size == 0:
        continue
      first, last = int(ids[sel].min()), int(ids[sel].max()) + 1
      rows = self._rows(EMBED, first, last)[ids[sel] - first]
      out[sel] = rows if self._q is None else rot.rotate_embedding(rows, self._q)
    return out

  def final_norm(self) -> dict:
    """The final norm's params as float32 numpy (the identity when rotated: its scale is folded
    into the head)."""
    try:
      norm = {"weight": np.asarray(self.ckpt.get(NORM, (self.config.hidden_size,)), np.float32)}
    finally:
      self.close()
    if self._q is None:
      return norm
    if self._w_final is None:
      self._w_final = rot.final_norm_scale(norm, self.file_config)
    return rot.identity_norm(norm, self.file_config)

  def head_columns(self, lo: int, hi: int) -> np.ndarray:
    """float32 ``[hidden, hi - lo]``: columns ``lo:hi`` of the output projection's kernel (the
    tied embedding's rows, transposed, for a tied model), rotated when the source rotates."""
    name = EMBED if self.file_config.tie_word_embeddings else HEAD
    rows = self._rows(name, lo, hi)
    if self._q is None:
      return np.ascontiguousarray(rows.T)
    if self._w_final is None:
      self.final_norm()
    return rot.rotate_head(rows.T, self._q, self._w_final)

  def head_slice(self, lo: int, hi: int, dtype: Any) -> jax.Array:
    """``head_columns(lo, hi)`` on the device in ``dtype``."""
    return to_device(self.head_columns(lo, hi), dtype)

  def nonlayer_pieces(self, dtype: Any, skip: tuple[str, ...] = ()) -> Iterator[tuple]:
    """``(key, leaf, axis, pieces)`` for the embedding and (untied) output projection, ``pieces``
    an iterator of host arrays in ``dtype`` (what the checkpoint stores), a slice at a time."""
    import ml_dtypes  # noqa: F401,PLC0415 (bfloat16 for numpy)

    np_dtype = np.dtype(jnp.dtype(dtype))
    chunks = self.vocab_chunks()
    if "embed_tokens" not in skip:
      yield ("embed_tokens", "embedding", 0,
             (self.embedding_rows(np.arange(lo, hi)).astype(np_dtype) for lo, hi in chunks))
    if not self.config.tie_word_embeddings and "lm_head" not in skip:
      yield ("lm_head", "kernel", 1,
             (self.head_columns(lo, hi).astype(np_dtype) for lo, hi in chunks))

  def nonlayer(self, dtype: Any) -> dict:
    """The embedding, final norm and (untied) output projection in ``dtype`` on the device, whole
    (small models only: the sample generation before)."""
    v = self.config.vocab_size
    out = {"norm": jax.tree.map(lambda x: to_device(x, dtype), self.final_norm()),
           "embed_tokens": {"embedding": to_device(self.embedding_rows(np.arange(v)), dtype)}}
    if not self.config.tie_word_embeddings:
      out["lm_head"] = {"kernel": to_device(self.head_columns(0, v), dtype)}
    return out

  def params(self, dtype: Any) -> dict:
    """The whole float model (only for small models: the sample generation before)."""
    out = self.nonlayer(dtype)
    for i in range(self.config.num_hidden_layers):
      out[f"layers_{i}"] = self.block(i, dtype)
    return out

  def close(self) -> None:
    close = getattr(self.ckpt, "close", None)
    if close is not None:
      close()


def source_digest(files: list[str]) -> str:
  """A digest of the weight files that reads a few KiB of each: size, the safetensors header
  (every tensor's name, dtype, shape and offsets) and ``_SAMPLES`` evenly spaced samples."""
  h = hashlib.sha256()
  for path in files:
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
      if path.endswith(".safetensors") and size >= 8:
        n = int.from_bytes(f.read(8), "little")
        h.update(f.read(min(n, size - 8)))
      for k in range(_SAMPLES):
        f.seek(max(0, (size - _SAMPLE_BYTES) * k // max(1, _SAMPLES - 1)))
        h.update(f.read(_SAMPLE_BYTES))
  return h.hexdigest()[:32]
