"""Text generation from any model this project reads, and the ``scripts/generate.py`` command line.

    python scripts/generate.py --model <orbax checkpoint | HF GPTQ folder | HF folder | .gguf | name>
        (--prompt TEXT ... | --prompt-file FILE) [--max-new-tokens N] [--temperature T]
        [--top-k K] [--top-p P] [--seed S] [--dtype float32|bfloat16] [--no-compile-cache]
        [--layer-loop auto|scan|loop]

The tokenizer comes with the model (the checkpoint's ``tokenizer/``, the HF folder's files, or the
one embedded in the GGUF). One prompt streams its continuation to stdout as tokens come; several
prompts (one per ``--prompt``, or one per line of ``--prompt-file``) run as one left-padded batch
and print one continuation each. The last line gives the time to first token and the decode rate.
Packed GPTQ weights stay packed (they run through ``quantized_matmul``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import numpy as np


def _is_hf_gptq(path: str) -> bool:
  if not os.path.isdir(path):
    return False
  if os.path.isfile(os.path.join(path, "quantize_config.json")):
    return True
  cfg = os.path.join(path, "config.json")
  if os.path.isfile(cfg):
    with open(cfg) as f:
      return "quantization_config" in json.load(f)
  return False


def _tokenizer_loader(spec: str) -> Callable[[], Any]:
  """A loader of the tokenizer of an HF folder, .gguf file or name. Building a tokenizer from a
  GGUF file takes many seconds: the result is saved once under the gptq_jax cache folder (keyed
  by the file's path, size and time) and read from there afterwards."""
  from gptq_jax.models import load_tokenizer, resolve_model_spec  # noqa: PLC0415

  def load():
    kind, path = resolve_model_spec(spec)
    if kind != "gguf":
      return _folder_tokenizer(path)()
    import hashlib  # noqa: PLC0415

    from gptq_jax.cli.compile_cache import default_dir  # noqa: PLC0415

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    folder = os.path.join(os.path.dirname(default_dir()), "tokenizers", key.hexdigest()[:16])
    if os.path.isdir(folder):
      try:
        return _folder_tokenizer(folder)()
      except ValueError:
        pass
    tok = load_tokenizer(spec)
    try:
      tok.save_pretrained(folder + ".tmp")
      os.replace(folder + ".tmp", folder)
    except OSError:
      pass
    return tok
  return load


class FastTokenizer:
  """The part of a transformers tokenizer the CLI needs, read straight from ``tokenizer.json`` with
  the ``tokenizers`` library (importing transformers alone takes seconds): ``__call__(text)`` ->
  ``{"input_ids": [...]}`` (special tokens as the file's post-processor adds them),
  ``decode(ids, skip_special_tokens=True)`` and ``eos_token_id``."""

  def __init__(self, folder: str):
    from tokenizers import Tokenizer  # noqa: PLC0415

    self._tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    self.eos_token_id = None
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
      with open(cfg_path) as f:
        eos = json.load(f).get("eos_token")
      eos = eos.get("content") if isinstance(eos, dict) else eos
      self.eos_token_id = self._tok.token_to_id(eos) if isinstance(eos, str) else None

  def __call__(self, text: str) -> dict:
    return {"input_ids": self._tok.encode(text).ids}

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _folder_tokenizer(folder: str) -> Callable[[], Any]:
  """A tokenizer loader for a folder: the fast path when it has a tokenizer.json, else
  transformers."""
  from gptq_jax.models import load_tokenizer  # noqa: PLC0415

  def load():
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
      try:
        return FastTokenizer(folder)
      except Exception:  # noqa: BLE001 (a file tokenizers cannot read: transformers may)
        pass
    return load_tokenizer(folder)
  return load


def load_for_generation(spec: str, dtype: str = "float32") -> tuple[Any, Any, Callable[[], Any]]:
  """(config, params, tokenizer loader) for a model spec; packed weights kept packed."""
  from gptq_jax import checkpoint  # noqa: PLC0415
  from gptq_jax.models import load_tokenizer  # noqa: PLC0415

  spec = os.fspath(spec)
  if checkpoint.is_checkpoint(spec):
    ckpt = checkpoint.load(spec)
    cfg, params = ckpt.model_config, ckpt.params
    if ckpt.tokenizer_dir is None:
      tok = lambda: None  # noqa: E731
    else:
      tok = _folder_tokenizer(ckpt.tokenizer_dir)
  elif _is_hf_gptq(spec):
    from gptq_jax.interop import import_hf  # noqa: PLC0415

    cfg, params, _ = import_hf(spec)
    tok = _folder_tokenizer(spec)
  else:
    try:
      from gptq_jax.models import load_model as _load  # noqa: PLC0415
    except ImportError:
      from gptq_jax.models import load_llama as _load  # noqa: PLC0415
    cfg, params = _load(spec)
    tok = _tokenizer_loader(spec)
  return cfg.replace(dtype=dtype), params, tok


def _encode(tokenizer, text: str) -> list[int]:
  ids = tokenizer(text)["input_ids"]
  return list(ids)


class _Streamer:
  """Prints the new text of one row as tokens arrive (decoding the whole continuation each time,
  so multi-token characters come out whole)."""

  def __init__(self, tokenizer, eos: tuple[int, ...], out=sys.stdout):
    self.tokenizer, self.eos, self.out = tokenizer, set(eos), out
    self.ids: list[int] = []
    self.printed = ""
    self.done = False

  def __call__(self, tokens: np.ndarray, step: int) -> None:
    if self.done:
      return
    t = int(tokens[0])
    if t in self.eos:
      self.done = True
      return
    self.ids.append(t)
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
      return
    self.out.write(text[len(self.printed):])
    self.out.flush()
    self.printed = text


def _parser() -> argparse.ArgumentParser:
  from gptq_jax.cli import compile_cache  # noqa: PLC0415

  p = argparse.ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True,
                 help="orbax checkpoint folder, HF GPTQ folder, HF folder, .gguf file or a name "
                      "(smollm2-135m)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
  src.add_argument("--prompt-file", help="a text file: one prompt per non-empty line")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=None)
  p.add_argument("--top-p", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype")
  p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
  p.add_argument("--layer-loop", choices=("auto", "scan", "loop"), default="auto",
                 help="run the layers with lax.scan or one call per layer (auto: the loop on "
                      "CPU and for layers of different structure, the scan elsewhere)")
  p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
  compile_cache.add_flag(p)
  return p


def run(args: argparse.Namespace) -> dict:
  from gptq_jax.cli import compile_cache  # noqa: PLC0415

  # every program: the per-layer ones compile fast but are many, and a warm run should compile none
  compile_cache.enable(args.compile_cache, min_compile_seconds=0.0)
  from gptq_jax.models import decode  # noqa: PLC0415

  t_start = time.perf_counter()
  if args.prompt_file is not None:
    if not os.path.isfile(args.prompt_file):
      raise FileNotFoundError(f"--prompt-file {args.prompt_file!r} does not exist")
    with open(args.prompt_file) as f:
      texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
      raise ValueError(f"--prompt-file {args.prompt_file!r} holds no prompt")
  else:
    texts = args.prompt
  if args.max_new_tokens <= 0:
    raise ValueError(f"--max-new-tokens {args.max_new_tokens} is invalid: expected >= 1")
  cfg, params, tok_loader = load_for_generation(args.model, args.dtype)
  tokenizer = tok_loader()
  if tokenizer is None:
    raise ValueError(f"{args.model!r} has no tokenizer: save the checkpoint with one")
  prompts = [_encode(tokenizer, t) for t in texts]
  eos = () if args.no_stop else tuple(getattr(cfg, "eos_token_ids", ()))
  if not args.no_stop and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
    eos = eos + (int(tokenizer.eos_token_id),)
  dm = decode.decode_model(params, cfg, args.layer_loop)
  t_loaded = time.perf_counter()
  stream = _Streamer(tokenizer, eos) if len(prompts) == 1 else None
  if stream is not None:
    sys.stdout.write(texts[0])
    sys.stdout.flush()
  res = decode.generate(dm, None, prompts, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, eos_token_id=list(eos), on_token=stream)
  texts_out = []
  for r in range(len(prompts)):
    ids = res.tokens[r, :res.lengths[r]].tolist()
    ids = [t for t in ids if t not in eos]
    texts_out.append(tokenizer.decode(ids, skip_special_tokens=True))
  if stream is not None:
    sys.stdout.write("\n")
  else:
    for t, o in zip(texts, texts_out):
      print(f"{t}{o}")
  n_new = int(np.sum(res.lengths))
  decode_tokens = max(n_new - len(prompts), 0)
  rate = decode_tokens / res.decode_time if res.decode_time > 0 and decode_tokens else 0.0
  summary = {"model": args.model, "prompts": len(prompts), "new_tokens": n_new,
             "load_seconds": round(t_loaded - t_start, 3), "ttft_seconds": round(res.ttft, 3),
             "decode_tokens_per_second": round(rate, 2),
             "total_seconds": round(time.perf_counter() - t_start, 3), "texts": texts_out}
  if args.json:
    print(json.dumps(summary))
  else:
    print(f"[{n_new} new tokens; load {summary['load_seconds']:.2f} s; time to first token "
          f"{res.ttft:.3f} s; decode {rate:.1f} tokens/s; total {summary['total_seconds']:.2f} s]")
  return summary


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    run(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
