"""GGUF files (llama.cpp) -> a Hugging Face config dict and HF-named float tensors.

`read_gguf(path)` returns `(hf_config_dict, {hf_tensor_name: float32 array in HF layout})` for the
GGUF architectures llama, qwen2, qwen3 and gemma3, with every llama.cpp convention undone, so the
Hugging Face tensor mapping is the only one from names to params. Tensors are dequantized with the
`gguf` package (every type it dequantizes; fp32, already `[out, in]`); the file's header is parsed
here (`gguf.GGUFReader` takes half a minute over a 262k-entry vocabulary).

What llama.cpp's converter (convert_hf_to_gguf.py) changes, and how it is undone here:
- names: `token_embd`, `blk.{i}.attn_q`, `ffn_norm`, ... -> the HF names (per architecture, since
  e.g. `ffn_norm` is Llama's post-attention norm but Gemma 3's pre-feed-forward norm);
- llama only: the rows of q and k (weights and biases) are permuted per head from HF's half-split
  rotary layout to interleaved pairs (llama.cpp's "normal" rope); `unpermute_rows` undoes it. qwen2,
  qwen3 and gemma3 use the NeoX rope in llama.cpp, so their rows are stored as in HF;
- gemma3: every `*norm.weight` (the four block norms, q_norm, k_norm and the final norm) is stored
  as `1 + w` (llama.cpp's RMSNorm multiplies by the weight, Gemma's by `1 + w`): 1 is subtracted;
- the output projection is written only when it is not tied to the token embedding;
- config values that are not in the metadata are llama.cpp's fixed choices for the architecture:
  Gemma 3's sliding-window pattern (every 6th layer global), local rope base 10000 and attention
  scale 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B).
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from gptq_jax.models.config import ModelConfig
from gptq_jax.models.hf import Params, model_params_from_tensors

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

# GGUF blk.{i}.<key> -> HF model.layers.{i}.<value>, per architecture.
_COMMON_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_LAYER_NAMES = dict(_COMMON_LAYER_NAMES, attn_norm="input_layernorm",
                          ffn_norm="post_attention_layernorm")
_QK_NORM_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LAYER_NAMES = {
    "llama": _LLAMA_LAYER_NAMES,
    "qwen2": _LLAMA_LAYER_NAMES,
    "qwen3": dict(_LLAMA_LAYER_NAMES, **_QK_NORM_NAMES),
    "gemma3": dict(_COMMON_LAYER_NAMES, **_QK_NORM_NAMES, attn_norm="input_layernorm",
                   post_attention_norm="post_attention_layernorm",
                   ffn_norm="pre_feedforward_layernorm", post_ffw_norm="post_feedforward_layernorm"),
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_HF_MODEL = {  # GGUF architecture -> (HF model_type, HF architecture)
    "llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
_GEMMA3_SLIDING_PATTERN = 6  # llama.cpp: layers i with (i + 1) % 6 != 0 use the sliding window
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GEMMA3_27B_LAYERS = 62


class _Tensor:
  __slots__ = ("name", "shape", "tensor_type", "data")

  def __init__(self, name: str, shape: tuple[int, ...], tensor_type: Any, data: np.ndarray):
    self.name, self.shape, self.tensor_type, self.data = name, shape, tensor_type, data


class _GGUFFile:
  """A GGUF file's metadata and tensors (memory-mapped raw bytes), read directly.

  `gguf.GGUFReader` builds an object per element of every metadata array, which costs half a
  minute for a 262k-token vocabulary; here string arrays are skipped over (their length is kept)
  and only the tensor bytes are mapped. Little-endian files, GGUF versions 2 and 3.
  """

  _SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}
  _STRING, _ARRAY, _BOOL = 8, 9, 7

  def __init__(self, path: str, gguf_module: Any):
    self._buf = np.memmap(path, dtype=np.uint8, mode="r")
    self._pos = 0
    if bytes(self._take(4)) != b"GGUF":
      raise ValueError("bad magic (not a GGUF file)")
    version = int(self._scalar(4))
    if version not in (2, 3):
      raise ValueError(f"GGUF version {version} (expected 2 or 3; big-endian files are not read)")
    n_tensors, n_kv = int(self._scalar(10)), int(self._scalar(10))
    self.fields: dict[str, Any] = {}
    for _ in range(n_kv):
      key = self._string()
      self.fields[key] = self._value(int(self._scalar(4)))
    infos = []
    for _ in range(n_tensors):
      name = self._string()
      dims = tuple(int(self._scalar(10)) for _ in range(int(self._scalar(4))))
      infos.append((name, dims, gguf_module.GGMLQuantizationType(int(self._scalar(4))),
                    int(self._scalar(10))))
    align = int(self.fields.get("general.alignment", 32))
    start = -(-self._pos // align) * align
    self.tensors = []
    for name, dims, qtype, offset in infos:
      block, nbytes = gguf_module.GGML_QUANT_SIZES[qtype]
      rows = int(np.prod(dims[1:], dtype=np.int64))
      row_bytes = dims[0] // block * nbytes
      begin = start + offset
      if begin + rows * row_bytes > self._buf.shape[0]:
        raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
      data = self._buf[begin:begin + rows * row_bytes].reshape(rows, row_bytes)
      self.tensors.append(_Tensor(name, dims, qtype, data))

  def release(self) -> None:
    """Drop the pages of the file this process has touched (they stay in the page cache): a
    streamed read of one block or one chunk does not stay resident."""
    raw = getattr(self._buf, "_mmap", None)
    if raw is not None and hasattr(raw, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
      raw.madvise(mmap.MADV_DONTNEED)

  def _take(self, n: int) -> np.ndarray:
    if self._pos + n > self._buf.shape[0]:
      raise ValueError("unexpected end of file in the header")
    out = self._buf[self._pos:self._pos + n]
    self._pos += n
    return out

  def _scalar(self, kind: int) -> Any:
    dtype = np.dtype(self._SCALARS[kind])
    return self._take(dtype.itemsize).view(dtype)[0]

  def _string(self) -> str:
    return bytes(self._take(int(self._scalar(10)))).decode("utf-8", errors="replace")

  def _value(self, kind: int) -> Any:
    if kind == self._STRING:
      return self._string()
    if kind == self._ARRAY:
      item, n = int(self._scalar(4)), int(self._scalar(10))
      if item == self._STRING:  # e.g. the vocabulary: skipped over, its length kept
        view, pos, read = memoryview(self._buf), self._pos, struct.Struct("<Q").unpack_from
        for _ in range(n):  # struct on the mapped bytes: ~50x faster than slicing the memmap
          pos += 8 + read(view, pos)[0]
        if pos > self._buf.shape[0]:
          raise ValueError("unexpected end of file in the header")
        self._pos = pos
        return _SkippedStrings(n)
      if item == self._ARRAY:
        return [self._value(self._ARRAY) for _ in range(n)]
      dtype = np.dtype(self._SCALARS[item])
      values = self._take(n * dtype.itemsize).view(dtype)
      return [bool(v) for v in values] if item == self._BOOL else values.tolist()
    value = self._scalar(kind)
    return bool(value) if kind == self._BOOL else value.item()


class _SkippedStrings:
  """A metadata array of strings that was not decoded (only its length is known)."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self) -> int:
    return self.n


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation. w: [n_heads * head_dim, ...] (a weight or a bias)."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(arch: str, gguf_name: str) -> str | None:
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split(".")
  names = _LAYER_NAMES[arch]
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in names:
    return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
  return None


class GGUFCheckpoint:
  """A GGUF file (memory-mapped): `.hf_config` (an HF config.json
  dict), `.tensor_names()` (HF names), `.get(hf_name)` (dequantized on demand), `.config`,
  `.params(dtype)`."""

  def __init__(self, path: str | os.PathLike):
    try:
      import gguf  # noqa: PLC0415 (optional dependency)
    except ImportError:
      raise ValueError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"GGUF file {self.path!r} does not exist")
    self._gguf = gguf
    try:
      self._reader = _GGUFFile(self.path, gguf)
    except Exception as e:  # noqa: BLE001 (ValueError, KeyError for an unknown type, ...)
      raise ValueError(f"{self.path!r} is not a readable GGUF file ({e})") from None
    self.arch = self._meta("general.architecture")
    if self.arch not in SUPPORTED_GGUF_ARCHITECTURES:
      raise ValueError(f"unsupported architecture in {self.path!r}: general.architecture="
                       f"{self.arch!r}; gptq_jax reads GGUF files of {SUPPORTED_GGUF_ARCHITECTURES}")
    if any(t.name == "rope_freqs.weight" for t in self._reader.tensors):
      raise ValueError(f"{self.path!r} carries rope_freqs (Llama 3.1 rope scaling as factors), "
                       "which gptq_jax does not read from GGUF: pass the Hugging Face folder")
    self._tensors = {}
    for t in self._reader.tensors:
      name = _hf_name(self.arch, t.name)
      if name is not None:
        self._tensors[name] = t
    if "model.embed_tokens.weight" not in self._tensors:
      raise ValueError(f"GGUF file {self.path!r} has no token_embd.weight tensor")
    self.hf_config = self._read_hf_config()
    self._config: ModelConfig | None = None

  # ----- metadata -----

  def _meta(self, key: str, default: Any = None) -> Any:
    value = self._reader.fields.get(key)
    if value is None:
      return default
    if isinstance(value, float):  # stored as float32: its shortest decimal (1e-05, not 9.99e-06)
      value = float(str(np.float32(value)))
    return value

  def _shape(self, hf_name: str) -> tuple[int, ...]:
    """HF (numpy) shape of a tensor: GGUF lists dimensions innermost first."""
    return tuple(int(d) for d in reversed(self._tensors[hf_name].shape))

  def _read_hf_config(self) -> dict[str, Any]:
    arch = self.arch
    a = lambda key, default=None: self._meta(f"{arch}.{key}", default)  # noqa: E731
    tok = lambda key: self._meta(f"tokenizer.ggml.{key}")  # noqa: E731
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    layers = int(a("block_count"))
    head_dim = a("attention.key_length", a("rope.dimension_count", hidden // heads))
    vocab = self._shape("model.embed_tokens.weight")[0]
    model_type, hf_arch = _HF_MODEL[arch]
    has = lambda name: name in self._tensors  # noqa: E731
    cfg: dict[str, Any] = {
        "architectures": [hf_arch], "model_type": model_type,
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")), "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(a("context_length", 2048)),
        "tie_word_embeddings": not has("lm_head.weight"),
        "bos_token_id": tok("bos_token_id"), "eos_token_id": tok("eos_token_id"),
        "pad_token_id": tok("padding_token_id"),
    }
    rope_theta = float(a("rope.freq_base", 10000.0))
    scaling = self._rope_scaling(a)
    if arch == "gemma3":
      full = {"rope_type": "default", "rope_theta": rope_theta}
      if scaling is not None:  # llama.cpp scales the global layers only
        full = dict(scaling, rope_theta=rope_theta)
      local_theta = float(a("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE))
      window = a("attention.sliding_window")
      scalar = hidden // heads if layers == _GEMMA3_27B_LAYERS else int(head_dim)
      cfg.update(
          hidden_activation="gelu_pytorch_tanh", attention_bias=False,
          query_pre_attn_scalar=scalar, sliding_window=None if window is None else int(window),
          layer_types=self._gemma3_layer_types(a, layers, window),
          rope_parameters={"full_attention": full,
                           "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
          # transformers 4 names of the same values
          rope_theta=rope_theta, rope_local_base_freq=local_theta, rope_scaling=scaling,
          final_logit_softcapping=a("final_logit_softcapping"), attn_logit_softcapping=None,
          use_bidirectional_attention=False)
    else:
      cfg.update(hidden_act="silu", rope_theta=rope_theta, rope_scaling=scaling,
                 rope_parameters=dict(scaling or {"rope_type": "default"}, rope_theta=rope_theta))
      if arch == "llama":
        cfg.update(attention_bias=has("model.layers.0.self_attn.q_proj.bias"),
                   mlp_bias=has("model.layers.0.mlp.gate_proj.bias"))
      elif arch == "qwen2":  # Qwen2 always has q/k/v biases; llama.cpp has no sliding window for it
        cfg.update(use_sliding_window=False, sliding_window=None)
      else:  # qwen3
        cfg.update(attention_bias=has("model.layers.0.self_attn.q_proj.bias"),
                   use_sliding_window=False, sliding_window=None)
    return cfg

  @staticmethod
  def _rope_scaling(a: Callable[..., Any]) -> dict[str, Any] | None:
    kind = a("rope.scaling.type")
    if kind in (None, "none"):
      return None
    out: dict[str, Any] = {"rope_type": kind, "factor": float(a("rope.scaling.factor"))}
    original = a("rope.scaling.original_context_length")
    if original is not None:
      out["original_max_position_embeddings"] = int(original)
    return out

  def _gemma3_layer_types(self, a: Callable[..., Any], layers: int, window: Any) -> list[str]:
    if window is None or int(window) <= 0:  # llama.cpp: no window, no sliding layers
      return ["full_attention"] * layers
    pattern = a("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # one flag per layer (newer converters), true = sliding
      return ["sliding_attention" if p else "full_attention" for p in pattern]
    period = int(pattern) if pattern else _GEMMA3_SLIDING_PATTERN
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]

  # ----- tensors -----

  def tensor_names(self) -> list[str]:
    """HF names of the tensors of the file (those of its architecture's mapping)."""
    return list(self._tensors)

  def get(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A tensor under its HF name: HF layout, float32, llama.cpp's conventions undone."""
    if name not in self._tensors:
      raise ValueError(f"GGUF file {self.path!r} is missing the tensor for {name!r}")
    t = self._tensors[name]
    shape = self._shape(name)
    rows = t.data.shape[0]
    w = np.empty((rows, int(np.prod(shape, dtype=np.int64)) // max(rows, 1)), np.float32)
    step = max(1, (1 << 24) // max(w.shape[1], 1))  # ~64 MB at a time: small temporaries
    for r in range(0, rows, step):
      w[r:r + step] = self._gguf.quants.dequantize(np.asarray(t.data[r:r + step]), t.tensor_type)
    w = w.reshape(shape)
    if self.arch == "llama":
      if ".self_attn.q_proj." in name:
        w = unpermute_rows(w, self.hf_config["num_attention_heads"])
      elif ".self_attn.k_proj." in name:
        w = unpermute_rows(w, self.hf_config["num_key_value_heads"])
    elif self.arch == "gemma3" and name.endswith("norm.weight"):
      w = w - np.float32(1.0)
    if expected_shape is not None and w.shape != tuple(expected_shape):
      raise ValueError(f"GGUF tensor {t.name!r} ({name}) has shape {w.shape}, expected "
                       f"{tuple(expected_shape)} from the file's metadata")
    return w

  def rows(self, name: str, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of a 2-D tensor that needs no layout conversion (the embedding, the
    output projection), dequantized to float32: only those rows are read."""
    if name not in self._tensors:
      raise ValueError(f"GGUF file {self.path!r} is missing the tensor for {name!r}")
    shape = self._shape(name)
    if len(shape) != 2 or ".self_attn." in name or name.endswith("norm.weight"):
      raise ValueError(f"GGUF rows of {name!r}: only the embedding and the output projection")
    t = self._tensors[name]
    lo, hi = max(0, lo), min(hi, shape[0])
    raw = np.asarray(t.data[lo:hi])
    return self._gguf.quants.dequantize(raw, t.tensor_type).astype(np.float32).reshape(
        hi - lo, shape[1])

  def close(self) -> None:
    """Release the pages read so far (the map itself stays open)."""
    self._reader.release()

  # ----- our model -----

  @property
  def config(self) -> ModelConfig:
    if self._config is None:
      self._config = ModelConfig.from_hf_dict(self.hf_config)
    return self._config

  def params(self, dtype: Any = jnp.float32) -> Params:
    return model_params_from_tensors(self.config, self.get, dtype)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(HF config.json dict, {HF tensor name: float32 array in HF layout `[out, in]`}) of a GGUF file
  of architecture llama, qwen2, qwen3 or gemma3, with llama.cpp's conventions undone."""
  ckpt = GGUFCheckpoint(path)
  return dict(ckpt.hf_config), {name: ckpt.get(name) for name in ckpt.tensor_names()}


def load_gguf(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[ModelConfig, Params]:
  """(config, params) of a GGUF file, dequantized to float and cast to `dtype`."""
  ckpt = GGUFCheckpoint(path)
  return ckpt.config, ckpt.params(dtype)


def load_gguf_tokenizer(path: str | os.PathLike):
  """The transformers tokenizer embedded in a GGUF file (offline)."""
  from transformers import AutoTokenizer  # noqa: PLC0415 (optional dependency)

  path = os.path.abspath(os.fspath(path))
  return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                       local_files_only=True)
