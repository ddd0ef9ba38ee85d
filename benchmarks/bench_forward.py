"""SmolLM2-135M forward speed: gptq_jax's Flax Llama vs transformers' LlamaForCausalLM (torch CPU).

    .venv/bin/python benchmarks/bench_forward.py [--prompt-len 512] [--decode-steps 32]
        [--repeats 5]

Both models hold the same float32 weights (the embedded GGUF, dequantized; the torch model is
built from them as tests/models/conftest.py does) and run on the same CPU in the same process,
one after the other, batch 1:
- prefill: the prompt (`--prompt-len` tokens of State of the Union text) through the model,
  writing the KV cache and returning the last position's logits (gptq_jax: `forward_with_cache`
  jitted, `last_only=True`; transformers: `use_cache=True, logits_to_keep=1`), median of
  `--repeats`, reported as tokens/s;
- full forward: logits for every position (what perplexity runs), median, tokens/s;
- decode: one token at a time with the KV cache after the prompt (gptq_jax: a fixed-size cache
  of prompt + steps slots and one jitted step; transformers: its DynamicCache), greedy, median
  step latency over `--decode-steps` steps (after one warm-up step).
transformers runs with each of `--torch-threads` (default: torch's own count, and 1 — on an
oversubscribed machine one thread can be faster) and the baseline is its best per metric.
Compile time (gptq_jax's first calls) is reported separately. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit_json, log, median_time, ratio, table  # noqa: E402


def prompt_tokens(tokenizer, n: int) -> np.ndarray:
  from gptq_jax.data import sotu_texts, tokenize_text

  tokens = tokenize_text(sotu_texts("eval"), tokenizer)
  if tokens.shape[0] < n:
    raise SystemExit(f"--prompt-len {n}: the evaluation text has only {tokens.shape[0]} tokens")
  return tokens[:n].astype(np.int32)


def bench_jax(cfg, params, ids: np.ndarray, steps: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp

  from gptq_jax.models import forward, forward_with_cache, init_kv_cache

  p = ids.shape[0]
  total = p + steps + 1
  prompt = jnp.asarray(ids[None])
  mask = jnp.ones((1, total), jnp.int32)
  positions = jnp.arange(p, dtype=jnp.int32)[None]

  @functools.partial(jax.jit, donate_argnums=(1,))
  def prefill(params, cache):
    logits, cache = forward_with_cache(params, cfg, prompt, cache, 0, mask, positions,
                                       last_only=True)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(params, token, cache, slot):
    logits, cache = forward_with_cache(params, cfg, token[:, None], cache, slot, mask,
                                       jnp.full((1, 1), slot, jnp.int32))
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  full = jax.jit(lambda params: forward(params, cfg, prompt))

  def run_prefill():
    return jax.block_until_ready(prefill(params, init_kv_cache(cfg, 1, total)))

  t0 = time.perf_counter()
  run_prefill()
  compile_prefill = time.perf_counter() - t0
  prefill_s, _ = median_time(run_prefill, repeats)
  t0 = time.perf_counter()
  jax.block_until_ready(full(params))
  compile_full = time.perf_counter() - t0
  full_s, _ = median_time(lambda: jax.block_until_ready(full(params)), repeats)

  token, cache = run_prefill()
  t0 = time.perf_counter()
  token, cache = jax.block_until_ready(step(params, token, cache, jnp.int32(p)))
  compile_step = time.perf_counter() - t0
  times, generated = [], []
  for i in range(1, steps + 1):
    t0 = time.perf_counter()
    token, cache = jax.block_until_ready(step(params, token, cache, jnp.int32(p + i)))
    times.append(time.perf_counter() - t0)
    generated.append(int(token[0]))
  return {"prefill_s": prefill_s, "full_forward_s": full_s, "decode_step_s": statistics.median(times),
          "compile_s": {"prefill": compile_prefill, "full_forward": compile_full,
                        "decode_step": compile_step},
          "generated": generated}


def bench_torch(model, ids: np.ndarray, steps: int, repeats: int) -> dict:
  import torch

  prompt = torch.from_numpy(ids[None].astype(np.int64))
  warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

  def run_prefill():
    return model(prompt, use_cache=True, logits_to_keep=1)

  with torch.inference_mode():
    run_prefill()  # warm-up
    prefill_s, _ = median_time(run_prefill, repeats)
    full_s, _ = median_time(lambda: model(prompt, use_cache=False), repeats)
    out = run_prefill()
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    out = model(token, past_key_values=cache, use_cache=True)  # warm-up step
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    times, generated = [], []
    for _ in range(steps):
      t0 = time.perf_counter()
      out = model(token, past_key_values=cache, use_cache=True)
      token = out.logits[:, -1].argmax(-1, keepdim=True)
      times.append(time.perf_counter() - t0)
      generated.append(int(token[0, 0]))
  return {"prefill_s": prefill_s, "full_forward_s": full_s, "decode_step_s": statistics.median(times),
          "generated": generated, "threads": torch.get_num_threads(),
          "torch": torch.__version__}


def torch_twin(cfg, params):
  """transformers' LlamaForCausalLM (fp32, eval) with the same weights (lm_head tied)."""
  import torch
  import transformers

  from gptq_jax.models import to_hf_state_dict

  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict())).eval()
  state = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_state_dict(cfg, params).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  if unexpected or not set(missing) <= {"lm_head.weight"}:
    raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
  return model


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--prompt-len", type=int, default=512)
  ap.add_argument("--decode-steps", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--torch-threads", default="0,1",
                  help="torch intra-op thread counts to try (0 = torch's default); the baseline "
                       "takes, per metric, the fastest of them")
  args = ap.parse_args()

  from gptq_jax.models import load_llama, load_tokenizer

  cfg, params = load_llama(args.model)
  ids = prompt_tokens(load_tokenizer(args.model), args.prompt_len)
  model = torch_twin(cfg, params)
  import torch

  default_threads = torch.get_num_threads()
  runs = []
  for n in dict.fromkeys(int(t) or default_threads for t in args.torch_threads.split(",")):
    torch.set_num_threads(n)
    log(f"transformers, {n} thread(s) ...")
    runs.append(bench_torch(model, ids, args.decode_steps, args.repeats))
  torch.set_num_threads(default_threads)
  del model
  theirs = dict(runs[0], threads=[r["threads"] for r in runs])
  for key in ("prefill_s", "full_forward_s", "decode_step_s"):  # the best torch setting, per metric
    theirs[key] = min(r[key] for r in runs)
  log("gptq_jax ...")
  ours = bench_jax(cfg, params, ids, args.decode_steps, args.repeats)

  p = args.prompt_len
  rows = []
  for name, key, unit in (("prefill (KV cache, last logits)", "prefill_s", "tok/s"),
                          ("full forward (all logits)", "full_forward_s", "tok/s"),
                          ("decode step", "decode_step_s", "ms")):
    if unit == "tok/s":
      o, t = p / ours[key], p / theirs[key]
      rows.append((name, f"{o:.0f} tok/s", f"{t:.0f} tok/s", o / t))
    else:
      o, t = ours[key] * 1e3, theirs[key] * 1e3
      rows.append((name, f"{o:.2f} ms", f"{t:.2f} ms", t / o))
  same = sum(a == b for a, b in zip(ours["generated"], theirs["generated"]))
  print(f"SmolLM2-135M fp32, batch 1, prompt {p} tokens, {args.decode_steps} decode steps; "
        f"transformers on torch {theirs['torch']}, best of {theirs['threads']} threads per metric")
  print(table(("", "gptq_jax", "transformers", "speedup (x)"), rows))
  print(f"gptq_jax compile: " + ", ".join(f"{k} {v:.2f}s" for k, v in ours["compile_s"].items()))
  print(f"greedy tokens equal in {same}/{args.decode_steps} decode steps")
  emit_json({
      "bench": "forward", "model": args.model, "dtype": "float32", "prompt_len": p,
      "decode_steps": args.decode_steps, "baseline": f"transformers LlamaForCausalLM, torch "
      f"{theirs['torch']} CPU, best of {theirs['threads']} threads per metric",
      "ours": {k: v for k, v in ours.items() if k != "generated"},
      "baseline_figures": {k: v for k, v in theirs.items() if k != "generated"},
      "baseline_runs": [{k: v for k, v in r.items() if k != "generated"} for r in runs],
      "prefill_tok_s": p / ours["prefill_s"], "baseline_prefill_tok_s": p / theirs["prefill_s"],
      "prefill_speedup": ratio(theirs["prefill_s"], ours["prefill_s"]),
      "full_forward_speedup": ratio(theirs["full_forward_s"], ours["full_forward_s"]),
      "decode_step_ms": ours["decode_step_s"] * 1e3,
      "baseline_decode_step_ms": theirs["decode_step_s"] * 1e3,
      "decode_speedup": ratio(theirs["decode_step_s"], ours["decode_step_s"]),
      "greedy_tokens_equal": same, "loadavg": os.getloadavg()})


if __name__ == "__main__":
  main()
