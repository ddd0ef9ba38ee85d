"""The CLI's streamed path: weights stay on the host, one block at a time goes to the devices.

``ModelSource`` opens an HF folder (memory-mapped safetensors) or a GGUF file (tensors
dequantized one at a time) and reads one decoder block, or the embedding, on demand.
``StreamedRun`` is the ``DecoderAdapter`` the driver quantizes through: ``get_block(i)`` reads
block ``i`` from the source (the memory maps are closed again right after, so no page stays
resident), ``set_block(i, q)`` hands the quantized block to the run's sink and keeps nothing (the
driver's ``on_block_done`` saves it for resume at once; the outputs are assembled from those
saves, ``cli/output.py``). When perplexity is wanted, two
``EvalStream``s ride along: the held-out windows carried through each float block as it is read
(before) and through each quantized block as it is done (after), so the before / after perplexity
needs no second pass over the weights and never the whole model on a device.

``source_digest`` is the resume fingerprint of the weights: sizes, the safetensors headers and a
few evenly spaced samples of each file's bytes — not every tensor.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gptq_jax.models import hf as hf_lib
from gptq_jax.pipeline.adapter import ModelAdapter, block_adapter
from gptq_jax.pipeline.capture import ctx_advancer_for, runner_for

DTYPES = ("bfloat16", "float32")
_SAMPLES, _SAMPLE_BYTES = 16, 4096  # bytes sampled per weight file for the fingerprint


class ModelSource:
  """A model read lazily from its files: ``.config``, ``.block(i, dtype)``, ``.nonlayer(dtype)``."""

  def __init__(self, spec: str):
    from gptq_jax.models import GGUFCheckpoint, HFCheckpoint, resolve_model_spec

    self.kind, self.path = resolve_model_spec(spec)
    self.ckpt = HFCheckpoint(self.path) if self.kind == "hf" else GGUFCheckpoint(self.path)
    self.config = self.ckpt.config

  @property
  def files(self) -> list[str]:
    """Every file the weights are read from (config.json first for a folder)."""
    if self.kind == "gguf":
      return [self.path]
    weights = sorted(set(getattr(self.ckpt, "_where", {}).values()))
    return [os.path.join(self.path, "config.json"), *weights]

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
      specs += [(s.path, s.fused_name, (len(s.names),) + s.shape)
                for s in hf_lib.layer_expert_specs(cfg, i)]
    for _, _, shape in specs:
      n += math.prod(shape)
    return n * jnp.dtype(dtype).itemsize

  def _read(self, specs, dtype) -> dict:
    try:
      return hf_lib.params_from_tensors(specs, self.ckpt.get, dtype)
    finally:
      self.close()  # drop the memory maps: no page of the file stays resident

  def block(self, i: int, dtype: Any) -> dict:
    """Decoder block i (a sparse block's experts stacked, from per-expert or fused tensors)."""
    try:
      has = getattr(self.ckpt, "has", lambda name: True)
      return hf_lib.layer_from_tensors(self.config, i, self.ckpt.get, has, dtype)
    finally:
      self.close()

  def nonlayer(self, dtype: Any, only: tuple[str, ...] | None = None) -> dict:
    specs = [s for s in hf_lib.nonlayer_tensor_specs(self.config) if only is None or
             s[0][0] in only]
    return self._read(specs, dtype)

  def nonlayer_host(self, dtype: Any, only: tuple[str, ...] | None = None) -> dict:
    """``nonlayer`` as host numpy arrays (what the checkpoint stores), each tensor copied once."""
    import ml_dtypes  # noqa: F401,PLC0415 (bfloat16 for numpy)

    out: dict = {}
    np_dtype = np.dtype(jnp.dtype(dtype))
    try:
      for path, name, shape in hf_lib.nonlayer_tensor_specs(self.config):
        if only is not None and path[0] not in only:
          continue
        value = self.ckpt.get(name, shape)
        value = np.array(value.T if path[-1] == "kernel" else value, dtype=np_dtype, order="C")
        node = out
        for key in path[:-1]:
          node = node.setdefault(key, {})
        node[path[-1]] = value
    finally:
      self.close()
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


# ----- perplexity through the blocks, one at a time ---------------------------------------------

@functools.partial(jax.jit, static_argnums=1)
def _final_nll(final_params, cfg, hidden, windows):
  """hidden [b, seqlen, h] after the last block -> summed NLL of tokens 1.. of each window [b]."""
  from gptq_jax.models import final_logits

  logits = final_logits(final_params, cfg, hidden)[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0], axis=-1)


class EvalStream:
  """Non-overlapping ``seqlen`` windows of held-out tokens, carried block by block."""

  def __init__(self, adapter, embed_params, windows: np.ndarray, batch: int = 1):
    self.windows = [windows[s:s + batch] for s in range(0, len(windows), batch)]
    self.state = []
    for w in self.windows:
      ids = jnp.asarray(w)
      self.state.append(adapter.embed(embed_params, ids, jnp.ones_like(ids)))
    self.at = 0  # blocks applied so far

  def advance(self, run, block_params, advance_ctx=None) -> None:
    """Carry the windows through one block; ``advance_ctx`` (``capture.ctx_advancer_for``, None
    for most models) gives the next block's context (Gemma 4)."""
    self.state = [(run(block_params, h, ctx),
                   ctx if advance_ctx is None else advance_ctx(block_params, h, ctx))
                  for h, ctx in self.state]
    self.at += 1

  def perplexity(self, final_params, cfg) -> float:
    nll = sum(float(np.sum(np.asarray(_final_nll(final_params, cfg, h, jnp.asarray(w))),
                           dtype=np.float64)) for (h, _), w in zip(self.state, self.windows))
    tokens = sum(w.shape[0] * (w.shape[1] - 1) for w in self.windows)
    return math.exp(nll / tokens)


def eval_windows(tokens: np.ndarray, seqlen: int, max_windows: int,
                 bos_token_id: int | None = None) -> np.ndarray:
  """``[n, seqlen]`` non-overlapping windows; with ``bos_token_id`` each is that token followed by
  ``seqlen - 1`` text tokens (as ``eval.window_nll`` cuts them)."""
  if bos_token_id is not None:
    tokens = np.asarray(tokens, np.int32)
    tokens = tokens[1:] if tokens.size and tokens[0] == bos_token_id else tokens
    body = eval_windows(tokens, seqlen - 1, max_windows)
    return np.concatenate([np.full((len(body), 1), bos_token_id, np.int32), body], axis=1)
  n = min(len(tokens) // seqlen, max_windows)
  if n == 0:
    raise ValueError(f"the evaluation text has {len(tokens)} tokens: no full window of "
                     f"--seqlen {seqlen}")
  return np.asarray(tokens[:n * seqlen], np.int32).reshape(n, seqlen)


# ----- the adapter the driver quantizes through -------------------------------------------------

def _trim_heap() -> None:
  """glibc's ``malloc_trim(0)``: return the free pages inside the heap to the system (freed
  blocks' buffers otherwise stay resident, fragmented between live allocations). No-op
  elsewhere."""
  try:
    import ctypes  # noqa: PLC0415

    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


Sink = Callable[[int, Any], None]


class StreamedRun(ModelAdapter):
  """The driver's view of a model on disk (see the module docstring).

  ``done``: blocks already quantized by an interrupted run (``i -> packed block``), returned as
  they are; ``evals``: ``(before, after)`` ``EvalStream``s or None.
  """

  def __init__(self, source: ModelSource, config, dtype: Any, sink: Sink,
               done: dict[int, Any] | None = None, evals: tuple | None = None):
    super().__init__(config)
    self.source, self.dtype, self.sink = source, dtype, sink
    self.done = done or {}
    self.evals = evals
    self.release_embedding = True
    self.blocks_read = []  # the indices read from the source, in order (tests, the breakdown)
    # seconds spent carrying the evaluation windows inside get_block and inside set_block
    self.eval_seconds = {"get": 0.0, "set": 0.0}

  def _advance(self, stream, block, i: int, where: str) -> None:
    t0 = time.perf_counter()
    # block i's own kind (sliding / full attention): one compiled runner per layer type
    stream.advance(runner_for(block_adapter(self, i), None, "data"), block,
                   ctx_advancer_for(self, i, None, "data"))
    jax.block_until_ready(stream.state)
    self.eval_seconds[where] += time.perf_counter() - t0

  def __hash__(self):  # the driver caches compiled steps per adapter
    return id(self)

  def __eq__(self, other):
    return self is other

  def _dense(self, block):
    """The quantized block dequantized in the compute dtype (what the after-stream runs)."""
    quantized = lambda x: hasattr(x, "dequantize")
    return jax.tree.map(lambda x: x.dequantize(self.dtype) if quantized(x) else x, block,
                        is_leaf=quantized)

  def get_block(self, params, i):
    _trim_heap()  # the previous block's buffers are free: give their pages back first
    if self.release_embedding:
      # The calibration and evaluation windows are embedded once, before block 0: the embedding
      # (and Gemma 4's per-layer input tables) are not needed on the devices after that (the
      # driver's params are this dict).
      for key in hf_lib.embedding_keys(self.config):
        params.pop(key, None)
    before = self.evals[0] if self.evals else None
    need_float = i not in self.done or (before is not None and before.at == i)
    block = None
    if need_float:
      block = self.source.block(i, self.dtype)
      self.blocks_read.append(i)
      if before is not None and before.at == i:  # once, even if refinement reads it again
        self._advance(before, block, i, "get")
    if i in self.done:
      q = self.done[i]
      if self.evals is not None and self.evals[1].at == i:
        self._advance(self.evals[1], self._dense(q), i, "get")
      return q
    return block

  def set_block(self, params, i, block_params):
    if self.evals is not None and self.evals[1].at == i:
      self._advance(self.evals[1], self._dense(block_params), i, "set")
    self.sink(i, block_params)
    return params
