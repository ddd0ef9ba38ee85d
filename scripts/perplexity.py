"""Perplexity of a model (any supported family) over non-overlapping windows of a text or a token array.

  python scripts/perplexity.py --model <orbax checkpoint | HF GPTQ folder | HF float folder | .gguf
                                       | smollm2-135m>
      (--text FILE | --text sotu-eval | --tokens FILE.npy)
      --seqlen N [--max-windows N] [--batch-size N] [--dtype float32|bfloat16] [--json]

`--text` takes a .txt file, a folder of .txt files, or `sotu-eval`: the bundled held-out State of
the Union addresses (2016-2021), the text scripts/quantize_llama.py reports on by default. Where
the tokenizer asks for `<bos>` (Gemma), every window starts with it, as in quantize_llama.py. With
`--json` the last line is one JSON object with at least {"ppl": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def load_model(spec: str):
  """(cfg, params, tokenizer loader) for a model spec in any format ``gptq_jax.load_model`` reads
  (orbax checkpoint, HF GPTQ folder, HF float folder, .gguf file, embedded name); says on stderr
  what it found. Packed kernels are dequantized to float32 (the weights they compute with)."""
  from gptq_jax.loading import open_model
  from gptq_jax.pipeline import dense_block

  loaded = open_model(spec)
  print(f"{spec}: {loaded.description}", file=sys.stderr, flush=True)
  params = dense_block(loaded.params) if loaded.quant_config is not None else loaded.params
  return loaded.config, params, loaded.tokenizer


def check_args(args) -> None:
  """What can be checked before loading the model."""
  from gptq_jax.data import check_text

  if args.tokens is not None and not os.path.isfile(args.tokens):
    raise FileNotFoundError(f"--tokens {args.tokens!r} does not exist")
  if args.text is not None:
    check_text(args.text, "--text")
  for flag, value, low in (("--seqlen", args.seqlen, 2), ("--max-windows", args.max_windows, 1),
                           ("--batch-size", args.batch_size, 1)):
    if value is not None and value < low:
      raise ValueError(f"{flag}={value} is invalid: expected an integer >= {low}")


def load_tokens(args, tokenizer_loader) -> tuple[np.ndarray, int | None]:
  """(token ids, the id every window starts with or None)."""
  if args.tokens is not None:
    return np.load(args.tokens, allow_pickle=False).reshape(-1), None
  from gptq_jax.data import bos_token_id, read_text, tokenize_text

  tokenizer = tokenizer_loader()
  return tokenize_text(read_text(args.text), tokenizer), bos_token_id(tokenizer)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True,
                      help="orbax checkpoint, HF GPTQ folder, HF float folder, .gguf file, or an "
                      "embedded name (smollm2-135m)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", help="a .txt file, a folder of .txt files, or 'sotu-eval' (the "
                      "bundled 2016-2021 addresses)")
  source.add_argument("--tokens", help="a .npy int array of token ids (flattened)")
  parser.add_argument("--seqlen", type=int, required=True)
  parser.add_argument("--max-windows", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype")
  parser.add_argument("--json", action="store_true", help="print a JSON object as the last line")
  from gptq_jax.cli import compile_cache

  compile_cache.add_flag(parser)
  args = parser.parse_args(argv)
  check_args(args)  # a missing text fails before the model loads
  compile_cache.from_args(args)

  from gptq_jax.eval import window_nll

  start = time.time()
  cfg, params, tokenizer_loader = load_model(args.model)
  cfg = cfg.replace(dtype=args.dtype)
  tokens, bos = load_tokens(args, tokenizer_loader)
  loaded = time.time()
  nll, count, windows = window_nll(params, cfg, tokens, seqlen=args.seqlen,
                                   max_windows=args.max_windows, batch_size=args.batch_size,
                                   bos_token_id=bos)
  result = {"ppl": float(np.exp(nll / count)), "nll": nll / count, "windows": windows,
            "scored_tokens": count, "seqlen": args.seqlen, "model": args.model,
            "dtype": args.dtype, "load_seconds": round(loaded - start, 2),
            "eval_seconds": round(time.time() - loaded, 2)}
  print(f"model {args.model}: perplexity {result['ppl']:.4f} over {windows} windows of "
        f"{args.seqlen} tokens ({count} scored; {result['eval_seconds']} s)")
  if args.json:
    print(json.dumps(result))
  return result


if __name__ == "__main__":
  from gptq_jax.integrity import exit_with_error

  try:
    main()
  except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
    exit_with_error(str(e))  # one line, nothing after it (see gptq_jax/integrity.py)
