"""Inference: time to first token and decode tokens/s, packed 4-bit vs dense fp32 vs dense bf16.

    .venv/bin/python benchmarks/bench_inference.py [--models smollm2-135m,gemma3-270m]
        [--batches 1,8] [--new-tokens 16] [--prompt-len 32] [--bits 4] [--group-size 128]
        [--no-layers] [--no-cli]

(a) One projection at batch 1 (``x[1, K] @ W``, jitted, best of many calls): 576x1536 and
    2048x8192, packed (``quantized_matmul``, XLA path) vs dense fp32 vs dense bf16.
(b) Per model and batch, all in this process, through ``gptq_jax.models.decode.generate``: time
    to first token cold (compiling, empty compilation cache), with the persistent compilation
    cache (in-memory caches cleared, the programs read back from disk), and hot; decode tokens/s
    per row. Weights: packed 4-bit and dense fp32 / bf16 on the per-layer loop (what "auto" runs
    on CPU), and dense fp32 on the scan too, so the packed figure is set against the fastest
    dense fp32 path ("x best fp32"). The packed model is RTN-quantized (latency does not depend
    on how the codes were found), float16 scales, prepared once. bf16 decodes ``--bf16-tokens``
    tokens only (XLA:CPU's bf16 dots are slow). Decode figures are the best of three hot runs;
    "CPU ms/step" is the process CPU time per step (less sensitive to a shared machine's load).
(c) ``scripts/generate.py`` on a packed orbax checkpoint of the first model, 12 new tokens: wall
    time of a cold run and of a warm one (compilation cache filled by the first).
(d) Roofline per decode token at batch 1 for TPU v5e (819 GB/s HBM, 197 TF/s bf16) and H100 SXM
    (3.35 TB/s, 989 TF/s): every weight byte read once per token (packed: qweight + f16 scales and
    zeros as the kernel reads them; bf16 embeddings) over the bandwidth; decode is memory-bound.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, emit_json, log, table  # noqa: E402

DEVICES = {"tpu_v5e": (819e9, 197e12), "h100": (3.35e12, 989e12)}
LAYERS = ((576, 1536), (2048, 8192))


def quantize_linears(params, bits: int, group_size: int):
  """Every decoder projection RTN-quantized and packed (gptq_v2, float16 scales)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from gptq_jax import GPTQConfig, rtn_quantize  # noqa: PLC0415

  qcfg = GPTQConfig(bits, group_size=group_size, sym=False, format="gptq_v2")
  quant = jax.jit(lambda k: rtn_quantize(k, qcfg).pack("gptq_v2"))

  def q(path, a):
    keys = [getattr(k, "key", "") for k in path]
    if keys[-1] == "kernel" and any(str(k).startswith("layers_") for k in keys):
      w = quant(jnp.asarray(a, jnp.float32))
      return w.replace(scales=w.scales.astype(jnp.float16))
    return a

  return jax.tree_util.tree_map_with_path(q, params)


def weight_bytes(params) -> dict:
  """Bytes read per decode token: packed (as the kernel reads), bf16 and fp32 forms."""
  import jax  # noqa: PLC0415

  from gptq_jax.kernels import prepare_params  # noqa: PLC0415
  from gptq_jax.kernels.linear import is_quantized  # noqa: PLC0415

  leaves = jax.tree.leaves(prepare_params(params), is_leaf=is_quantized)
  q = [a for a in leaves if is_quantized(a)]
  dense_q = sum(w.shape[0] * w.shape[1] for w in q)
  reads = sum(sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in (w.qweight, w.scales, w.zeros))
              for w in q)
  other = sum(int(np.prod(a.shape)) for a in leaves if not is_quantized(a))
  return {"linear_params": dense_q, "other_params": other, "packed": reads + 2 * other,
          "bf16": 2 * (dense_q + other), "fp32": 4 * (dense_q + other)}


def bench_layers(repeats: int) -> list[list]:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from gptq_jax import GPTQConfig, quantized_matmul, rtn_quantize  # noqa: PLC0415
  from gptq_jax.kernels import prepare_for_kernel  # noqa: PLC0415

  rows = []
  for k, n in LAYERS:
    w32 = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
    pk = rtn_quantize(w32, GPTQConfig(4, group_size=128, sym=False,
                                      format="gptq_v2")).pack("gptq_v2")
    pk = prepare_for_kernel(pk.replace(scales=pk.scales.astype(jnp.float16)))
    x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32)
    dense = jax.jit(lambda x, w: jnp.dot(x, w, precision="highest"))
    qmm = jax.jit(lambda x, w: quantized_matmul(x, w, backend="xla"))
    runs = {"packed": (qmm, x, pk), "fp32": (dense, x, w32),
            "bf16": (dense, x.astype(jnp.bfloat16), w32.astype(jnp.bfloat16))}
    best = {}
    calls = max(1, int(repeats * 2e6 / (k * n)))
    for name, (f, a, b) in runs.items():
      jax.block_until_ready(f(a, b))
      times = []
      for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
          r = f(a, b)
        jax.block_until_ready(r)
        times.append((time.perf_counter() - t0) / calls)
      best[name] = min(times) * 1e6
    log(f"layer {k}x{n}: {best}")
    rows.append([f"{k}x{n}", best["packed"], best["fp32"], best["bf16"],
                 best["fp32"] / best["packed"]])
  return rows


def bench_model(name: str, batches, new_tokens: int, bf16_tokens: int, prompt_len: int, bits: int,
                group_size: int, cache_dir: str, hot_runs: int = 3) -> tuple[list[dict], dict]:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from gptq_jax.models import decode  # noqa: PLC0415
  from gptq_jax.models import load_model  # noqa: PLC0415

  cfg, params = load_model(name)
  log(f"{name}: loaded ({cfg.num_hidden_layers} layers, vocab {cfg.vocab_size})")
  packed = quantize_linears(params, bits, group_size)
  sizes = weight_bytes(packed)
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  variants = {  # name: (config, params, layer loop, new tokens)
      "packed": (cfg, packed, "loop", new_tokens),
      "fp32": (cfg, params, "loop", new_tokens),
      "fp32 scan": (cfg, params, "scan", new_tokens),
      "bf16": (cfg.replace(dtype="bfloat16"), bf16, "loop", bf16_tokens),
  }
  rng = np.random.RandomState(0)
  rows = []
  for vname, (c, p, loop, n_new) in variants.items():
    dm = decode.DecodeModel(p, c, layer_loop=loop)
    for b in batches:
      prompts = [rng.randint(3, c.vocab_size, size=prompt_len - r % 3).tolist() for r in range(b)]
      kw = dict(max_new_tokens=n_new, eos_token_id=None)
      shutil.rmtree(cache_dir, ignore_errors=True)
      os.makedirs(cache_dir)
      jax.clear_caches()
      cold = decode.generate(dm, None, prompts, **kw)  # compiles, writes the persistent cache
      jax.clear_caches()  # forget the compiled programs in memory: read them back from disk
      cached = decode.generate(dm, None, prompts, **kw)
      rates, cpu_ms = [], []
      for _ in range(hot_runs):  # the best of a few: the machine is shared
        c0 = time.process_time()
        hot = decode.generate(dm, None, prompts, **kw)
        rates.append((hot.steps - 1) / hot.decode_time)
        cpu_ms.append((time.process_time() - c0) * 1e3 / hot.steps)
      rate = max(rates)
      row = {"model": name, "weights": vname, "batch": b, "ttft_cold_s": cold.ttft,
             "ttft_compile_cache_s": cached.ttft, "ttft_hot_s": hot.ttft,
             "decode_tokens_per_s": rate, "decode_tokens_per_s_all_rows": rate * b,
             "decode_ms_per_step": 1e3 / rate, "cpu_ms_per_token": min(cpu_ms)}
      log(f"{name} {vname} b={b}: ttft cold {cold.ttft:.2f} s, cached {cached.ttft:.2f} s, hot "
          f"{hot.ttft:.3f} s; decode {rate:.2f} tokens/s per row (runs {rates}); process CPU "
          f"{min(cpu_ms):.0f} ms per step")
      rows.append(row)
    del dm
  return rows, sizes


def bench_cli(name: str, bits: int, group_size: int, work: str) -> dict:
  """scripts/generate.py twice on a packed orbax checkpoint (12 new tokens): wall seconds."""
  from gptq_jax import GPTQConfig, checkpoint  # noqa: PLC0415
  from gptq_jax.cli.generate import load_for_generation  # noqa: PLC0415
  from gptq_jax.models import load_tokenizer  # noqa: PLC0415

  cfg, params, _ = load_for_generation(name)
  ckpt = os.path.join(work, "ckpt")
  checkpoint.save(ckpt, quantize_linears(params, bits, group_size), model_config=cfg,
                  quant_config=GPTQConfig(bits, group_size=group_size, sym=False,
                                          format="gptq_v2"), tokenizer=load_tokenizer(name))
  env = dict(os.environ, GPTQ_JAX_CACHE=os.path.join(work, "cli_cache"),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = {}
  for run in ("cold", "warm"):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "generate.py"),
                          "--model", ckpt, "--prompt", "The capital of France is",
                          "--max-new-tokens", "12", "--no-stop"],
                         capture_output=True, text=True, env=env, timeout=1200)
    out[f"{run}_wall_s"] = time.perf_counter() - t0
    if res.returncode != 0:
      raise RuntimeError(res.stderr[-2000:])
    out[f"{run}_output"] = res.stdout.strip().splitlines()
    log(f"generate.py {run}: {out[f'{run}_wall_s']:.1f} s: {out[f'{run}_output'][-1]}")
  return out


def roofline(name: str, sizes: dict) -> list[list]:
  rows = []
  for dev, (bw, _) in DEVICES.items():
    for form in ("packed", "bf16", "fp32"):
      rows.append([name, dev, form, sizes[form] / 2**20, bw / sizes[form]])
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--new-tokens", type=int, default=16)
  ap.add_argument("--bf16-tokens", type=int, default=4)
  ap.add_argument("--prompt-len", type=int, default=32)
  ap.add_argument("--bits", type=int, default=4)
  ap.add_argument("--group-size", type=int, default=128)
  ap.add_argument("--layer-repeats", type=int, default=200)
  ap.add_argument("--no-layers", action="store_true")
  ap.add_argument("--no-cli", action="store_true")
  args = ap.parse_args()
  work = tempfile.mkdtemp(prefix="bench_inference_")
  cache_dir = os.path.join(work, "jax_cache")
  from gptq_jax.cli import compile_cache  # noqa: PLC0415

  compile_cache.enable(path=cache_dir, min_compile_seconds=0.0)  # as generate.py
  import jax  # noqa: PLC0415

  batches = [int(b) for b in args.batches.split(",")]
  result = {"bits": args.bits, "group_size": args.group_size, "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len, "jax": jax.__version__,
            "platform": jax.default_backend()}
  if not args.no_layers:
    layer_rows = bench_layers(args.layer_repeats)
    result["layers_us"] = [dict(zip(["shape", "packed", "fp32", "bf16", "packed_speedup_vs_fp32"],
                                    r)) for r in layer_rows]
  rows, roof, skipped = [], [], {}
  for name in args.models.split(","):
    try:
      r, sizes = bench_model(name, batches, args.new_tokens, args.bf16_tokens, args.prompt_len,
                             args.bits, args.group_size, cache_dir)
    except (ValueError, FileNotFoundError, ImportError) as e:
      skipped[name] = str(e)
      log(f"{name}: skipped ({e})")
      continue
    rows += r
    roof += roofline(name, sizes)
    result[f"bytes_{name}"] = sizes
  result["runs"], result["skipped"] = rows, skipped
  result["roofline"] = [dict(zip(["model", "device", "weights", "mib", "tokens_per_s_bound"], r))
                        for r in roof]
  if not args.no_cli and rows:
    result["cli"] = bench_cli(rows[0]["model"], args.bits, args.group_size, work)

  print(f"jax {jax.__version__} on {jax.default_backend()}; {args.bits}-bit g{args.group_size} "
        f"(RTN), {args.new_tokens} new tokens after ~{args.prompt_len}-token prompts")
  if not args.no_layers:
    print("\n(a) one projection at batch 1, microseconds (best of 5 x many calls)")
    print(table(["shape", "packed", "fp32", "bf16", "fp32 / packed"], layer_rows))
  print("\n(b) generation through decode.generate (per-layer loop unless named scan)")
  fp32 = {}  # the fastest dense fp32 path per (model, batch)
  for r in rows:
    if r["weights"].startswith("fp32"):
      key = (r["model"], r["batch"])
      fp32[key] = max(fp32.get(key, 0.0), r["decode_tokens_per_s"])
  for r in rows:
    r["speedup_vs_best_fp32"] = r["decode_tokens_per_s"] / fp32[(r["model"], r["batch"])]
  print(table(["model", "weights", "batch", "TTFT cold s", "TTFT comp-cache s", "TTFT hot s",
               "decode tok/s/row", "x best fp32", "CPU ms/step"],
              [[r["model"], r["weights"], r["batch"], r["ttft_cold_s"], r["ttft_compile_cache_s"],
                r["ttft_hot_s"], r["decode_tokens_per_s"], r["speedup_vs_best_fp32"],
                r["cpu_ms_per_token"]] for r in rows]))
  print("\n(d) roofline: decode tokens/s bound at batch 1 (weights read once per token)")
  print(table(["model", "device", "weights", "MiB / token", "tokens/s bound"], roof))
  if "cli" in result:
    c = result["cli"]
    print(f"\n(c) scripts/generate.py, 12 new tokens, packed orbax checkpoint: cold "
          f"{c['cold_wall_s']:.1f} s, warm {c['warm_wall_s']:.1f} s; last line: "
          f"{c['warm_output'][-1]}")
  if skipped:
    print(f"\nskipped: {skipped}")
  shutil.rmtree(work, ignore_errors=True)
  emit_json(result)


if __name__ == "__main__":
  main()
