"""A tiny Llama as a Hugging Face folder (random weights + a small BPE tokenizer trained on SOTU
text), and a runner for the real ``scripts/quantize_llama.py`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.xla_env import one_device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "quantize_llama.py")
LAYERS = 6
# Small and fast: 4-bit, group 32, 4 calibration windows of 32 tokens; no eval, no sample.
FAST = ["--bits", "4", "--group-size", "32", "--nsamples", "4", "--seqlen", "32", "--desc-act",
        "--eval-text", "none", "--sample-prompt", "", "--no-progress"]


def tiny_tokenizer(vocab_size: int = 320):
  """A byte-level BPE tokenizer trained on one bundled address (transformers' fast tokenizer)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  from gptq_jax.data import sotu_files

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train(sotu_files("calib")[:1], trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> str:
  """An HF folder: a 6-block Llama whose every linear is 64 x 64 (one compiled solver)."""
  return write_tiny_llama(str(tmp_path_factory.mktemp("tiny_hf")), LAYERS)


def write_tiny_llama(folder: str, layers: int) -> str:
  """A tiny Llama HF folder (every linear 64 x 64, tied embedding, the tiny tokenizer)."""
  from gptq_jax.models import LlamaConfig, init_params, save_hf_folder

  tokenizer = tiny_tokenizer()
  cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                    head_dim=16, tie_word_embeddings=True)
  save_hf_folder(folder, cfg, init_params(cfg, 0))
  tokenizer.save_pretrained(folder)
  return folder


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict:
  """The subprocesses' environment: one CPU device, and a shared JAX compilation cache so later
  runs reuse the first run's executables."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = one_device_flags()
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
  """Run scripts/quantize_llama.py to completion; stdout and stderr captured as text."""
  return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True,
                        timeout=600, cwd=ROOT, **kw)
