"""Perplexity of a model (any supported family) over non-overlapping windows of a text or a token array.

  python scripts/perplexity.py --model <checkpoint | HF dir | .gguf | smollm2-135m>
      (--text FILE | --tokens FILE.npy)
      --seqlen N [--max-windows N] [--batch-size N] [--dtype float32|bfloat16] [--json]

`--text` takes a .txt file or a folder of .txt files (the bundled SOTU eval text:
gptq_jax/assets/sotu). With `--json` the last line is one JSON object with at least {"ppl": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def load_model(spec: str):
  """(cfg, params, tokenizer loader) for a model spec: a gptq_jax (orbax) checkpoint folder written
  by quantize_llama.py, an HF folder, a .gguf file or a name.

  The one place that knows model formats. A quantized checkpoint's packed kernels are dequantized
  to float32 (the same weights its packed layers compute with).
  """
  from gptq_jax import checkpoint
  from gptq_jax.models import load_model, load_tokenizer

  if checkpoint.is_checkpoint(spec):
    from gptq_jax.pipeline import dense_block

    ckpt = checkpoint.load(spec)
    if ckpt.tokenizer_dir is None:
      tokenizer_loader = lambda: None  # noqa: E731 (tokenize_text says to pass --tokens)
    else:
      tokenizer_loader = lambda: load_tokenizer(ckpt.tokenizer_dir)  # noqa: E731
    return ckpt.model_config, dense_block(ckpt.params), tokenizer_loader
  cfg, params = load_model(spec)
  return cfg, params, lambda: load_tokenizer(spec)


def load_tokens(args, tokenizer_loader) -> np.ndarray:
  if args.tokens is not None:
    if not os.path.isfile(args.tokens):
      raise FileNotFoundError(f"--tokens {args.tokens!r} does not exist")
    return np.load(args.tokens, allow_pickle=False).reshape(-1)
  from gptq_jax.data import read_text, tokenize_text

  return tokenize_text(read_text(args.text), tokenizer_loader())


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True,
                      help="quantized checkpoint folder, HF folder, .gguf file, or smollm2-135m")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", help="a .txt file or a folder of .txt files")
  source.add_argument("--tokens", help="a .npy int array of token ids (flattened)")
  parser.add_argument("--seqlen", type=int, required=True)
  parser.add_argument("--max-windows", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype")
  parser.add_argument("--json", action="store_true", help="print a JSON object as the last line")
  args = parser.parse_args(argv)

  from gptq_jax.eval import window_nll

  start = time.time()
  cfg, params, tokenizer_loader = load_model(args.model)
  cfg = cfg.replace(dtype=args.dtype)
  tokens = load_tokens(args, tokenizer_loader)
  loaded = time.time()
  nll, count, windows = window_nll(params, cfg, tokens, seqlen=args.seqlen,
                                   max_windows=args.max_windows, batch_size=args.batch_size)
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
  try:
    main()
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
