"""Inference from packed GPTQ weights: bytes, CPU decode latency, and a TPU / GPU roofline.

    .venv/bin/python benchmarks/bench_inference.py [--bits 4] [--group-size 128] [--repeats 10]
        [--cache-len 64] [--no-model]

(a) Bytes of the linears (and of the whole model) of SmolLM2-135M, packed in the Hugging Face
    layout (int32 qweight / qzeros, float16 scales, int32 g_idx) and as the kernel reads them
    (``PreparedWeight``: qweight + float16 scales and zeros), vs bfloat16.
(b) Decode-step latency at batch 1 on this CPU, in the same run: packed (XLA path, weights
    prepared once with ``prepare_params``) vs bf16 dense vs fp32 dense, for one 4096x11008 layer
    (``x[1, 4096] @ W``) and for a whole SmolLM2-135M decode step (KV cache of ``--cache-len``).
    The packed model is RTN-quantized (``rtn_quantize`` per linear): latency does not depend on how
    the codes were found.
(c) A roofline for TPU v5e (819 GB/s HBM, 197 TF/s bf16) and H100 SXM (3.35 TB/s, 989 TF/s bf16):
    the bytes each kernel reads per decode token (batch 1) over the bandwidth, vs 2 x params FLOPs
    over the peak; decode is memory-bound, so the packed weights' bound is the byte ratio.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit_json, log, median_time, ratio, table  # noqa: E402

DEVICES = {"tpu_v5e": (819e9, 197e12), "h100": (3.35e12, 989e12)}
LAYER = (4096, 11008)


def nbytes(tree) -> int:
  import jax  # noqa: PLC0415

  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def quantize_linears(params, n_layers: int, bits: int, group_size: int):
  """Every decoder projection RTN-quantized and packed (HF layout, float16 scales)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from gptq_jax import GPTQConfig, rtn_quantize  # noqa: PLC0415
  from gptq_jax.pipeline.adapter import LLAMA_GROUPS  # noqa: PLC0415

  qcfg = GPTQConfig(bits, group_size=group_size, sym=False, format="gptq_v2")
  quant = jax.jit(lambda k: rtn_quantize(k, qcfg).pack("gptq_v2"))
  params = jax.tree.map(lambda a: a, params)  # fresh dicts
  for i in range(n_layers):
    for group in LLAMA_GROUPS:
      for mod, proj in group:
        node = params[f"layers_{i}"][mod][proj]
        packed = quant(node["kernel"])
        node["kernel"] = packed.replace(scales=packed.scales.astype(jnp.float16))
  return params


def linear_bytes(params) -> dict:
  """Bytes of the decoder projections: HF packed, as the kernel reads them, bf16 (and the rest)."""
  from gptq_jax.kernels import prepare_params  # noqa: PLC0415
  from gptq_jax.kernels.linear import is_quantized  # noqa: PLC0415

  import jax  # noqa: PLC0415

  quantized = [a for a in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(a)]
  prepared = [a for a in jax.tree.leaves(prepare_params(params), is_leaf=is_quantized)
              if is_quantized(a)]
  dense_elems = sum(w.shape[0] * w.shape[1] for w in quantized)
  rest = [a for a in jax.tree.leaves(params, is_leaf=is_quantized) if not is_quantized(a)]
  rest_elems = sum(int(np.prod(a.shape)) for a in rest)
  return {"params": dense_elems, "hf_packed": nbytes(quantized),
          "kernel_reads": sum(nbytes((w.qweight, w.scales, w.zeros)) for w in prepared),
          "bf16": 2 * dense_elems, "other_params": rest_elems}


def time_layer(bits: int, group_size: int, repeats: int) -> dict:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from gptq_jax import GPTQConfig, quantized_matmul, rtn_quantize  # noqa: PLC0415
  from gptq_jax.kernels import prepare_for_kernel  # noqa: PLC0415

  k, n = LAYER
  w32 = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
  packed = rtn_quantize(w32, GPTQConfig(bits, group_size=group_size, sym=False,
                                        format="gptq_v2")).pack("gptq_v2")
  packed = prepare_for_kernel(packed.replace(scales=packed.scales.astype(jnp.float16)))
  x = jax.random.normal(jax.random.key(1), (1, k), jnp.float32)
  dense = jax.jit(lambda x, w: jnp.dot(x, w))
  qmm = jax.jit(lambda x, w: quantized_matmul(x, w, backend="xla"))
  w16, x16 = w32.astype(jnp.bfloat16), x.astype(jnp.bfloat16)
  runs = {"packed_xla_f32": (qmm, x, packed), "packed_xla_bf16": (qmm, x16, packed),
          "bf16_dense": (dense, x16, w16), "fp32_dense": (dense, x, w32)}
  out = {}
  for name, (f, a, b) in runs.items():
    jax.block_until_ready(f(a, b))
    out[name] = median_time(lambda: jax.block_until_ready(f(a, b)), repeats)[0] * 1e3
    log(f"layer {name}: {out[name]:.3f} ms")
  # The packed result is the dequantized weights' product (same run, so a broken path shows).
  want = np.asarray(x, np.float64) @ np.asarray(packed.dequantize(), np.float64)
  err = np.abs(np.asarray(qmm(x, packed), np.float64) - want).max() / np.abs(want).max()
  out["packed_rel_err"] = float(err)
  return out


def time_model(bits: int, group_size: int, repeats: int, cache_len: int) -> tuple[dict, dict]:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from gptq_jax.kernels import prepare_params  # noqa: PLC0415
  from gptq_jax.models import forward_with_cache, init_kv_cache, load_llama  # noqa: PLC0415

  cfg, params = load_llama("smollm2-135m")
  packed = quantize_linears(params, cfg.num_hidden_layers, bits, group_size)
  sizes = linear_bytes(packed)
  variants = {
      "packed_xla": (cfg.replace(backend="xla"), prepare_params(packed)),
      "bf16_dense": (cfg.replace(dtype="bfloat16"), jax.tree.map(
          lambda a: a.astype(jnp.bfloat16), params)),
      "fp32_dense": (cfg, params),
  }
  step = jax.jit(forward_with_cache, static_argnums=1)
  ids = jnp.array([[42]], jnp.int32)
  mask = jnp.ones((1, cache_len), jnp.int32)
  pos = jnp.array([[cache_len - 1]], jnp.int32)
  out, logits = {}, {}
  for name, (c, p) in variants.items():
    cache = init_kv_cache(c, 1, cache_len)
    run = lambda: jax.block_until_ready(step(p, c, ids, cache, jnp.int32(cache_len - 1), mask, pos))  # noqa: E731,B023
    logits[name] = np.asarray(run()[0], np.float32)
    out[name] = median_time(run, repeats)[0] * 1e3
    log(f"smollm2 decode {name}: {out[name]:.2f} ms")
  # Sanity (reported): cosine of the packed (RTN 4-bit) and fp32 logits of the step.
  a, b = logits["packed_xla"].ravel(), logits["fp32_dense"].ravel()
  out["packed_vs_fp32_logits_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
  return out, sizes


def roofline(name: str, params: int, read_bytes: dict) -> list[list]:
  rows = []
  for dev, (bw, flops) in DEVICES.items():
    t_compute = 2 * params / flops
    for kind, nb in read_bytes.items():
      t_mem = nb / bw
      rows.append([name, dev, kind, nb / 2**20, t_mem * 1e6, t_compute * 1e6,
                   "memory" if t_mem > t_compute else "compute", 1 / max(t_mem, t_compute)])
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--bits", type=int, default=4)
  ap.add_argument("--group-size", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--cache-len", type=int, default=64)
  ap.add_argument("--no-model", action="store_true", help="skip SmolLM2-135M (layer only)")
  args = ap.parse_args()
  import jax  # noqa: PLC0415

  layer = time_layer(args.bits, args.group_size, args.repeats)
  model, sizes = ({}, None) if args.no_model else time_model(
      args.bits, args.group_size, args.repeats, args.cache_len)

  k, n = LAYER
  nvals = 32 // args.bits
  groups = k // args.group_size if args.group_size > 0 else 1
  layer_reads = {"packed": k // nvals * n * 4 + 2 * groups * n * 2, "bf16": 2 * k * n}
  rows = roofline(f"{k}x{n}", k * n, layer_reads)
  if sizes:
    rows += roofline("smollm2_linears", sizes["params"],
                     {"packed": sizes["kernel_reads"], "bf16": sizes["bf16"]})

  print(f"jax {jax.__version__} on {jax.default_backend()}, {args.bits}-bit group "
        f"{args.group_size}, batch 1, median of {args.repeats}")
  if sizes:
    print("\n(a) bytes of SmolLM2-135M's 210 decoder projections")
    print(table(["form", "MiB", "x bf16"], [
        ["bf16", sizes["bf16"] / 2**20, 1.0],
        ["HF packed (qweight, qzeros, f16 scales, g_idx)", sizes["hf_packed"] / 2**20,
         sizes["hf_packed"] / sizes["bf16"]],
        ["kernel reads (qweight, f16 scales + zeros)", sizes["kernel_reads"] / 2**20,
         sizes["kernel_reads"] / sizes["bf16"]]]))
    other = 2 * sizes["other_params"]
    print(f"whole model (embeddings and norms bf16): packed "
          f"{(sizes['hf_packed'] + other) / 2**20:.1f} MiB vs bf16 "
          f"{(sizes['bf16'] + other) / 2**20:.1f} MiB")
  print("\n(b) CPU decode latency, batch 1 (ms)")
  lat = [[f"{k}x{n} layer", layer["packed_xla_f32"], layer["bf16_dense"], layer["fp32_dense"],
          layer["packed_xla_f32"] / layer["bf16_dense"], layer["packed_xla_f32"] / layer["fp32_dense"]]]
  if model:
    lat.append(["SmolLM2-135M step", model["packed_xla"], model["bf16_dense"], model["fp32_dense"],
                model["packed_xla"] / model["bf16_dense"], model["packed_xla"] / model["fp32_dense"]])
  print(table(["what", "packed (XLA)", "bf16 dense", "fp32 dense", "packed/bf16", "packed/fp32"],
              lat))
  print(f"(packed layer with bf16 activations: {layer['packed_xla_bf16']:.3f} ms; relative error "
        f"vs the dequantized product {layer['packed_rel_err']:.2g})")
  print("\n(c) roofline, one decode token at batch 1 (weights only)")
  print(table(["weights", "device", "form", "MiB read", "t_mem us", "t_flops us", "bound",
               "tokens/s bound"], rows))

  result = {"bits": args.bits, "group_size": args.group_size, "layer_ms": layer,
            "layer_packed_over_bf16": ratio(layer["packed_xla_f32"], layer["bf16_dense"]),
            "layer_packed_over_fp32": ratio(layer["packed_xla_f32"], layer["fp32_dense"]),
            "roofline": [dict(zip(["weights", "device", "form", "mib", "t_mem_us", "t_flops_us",
                                   "bound", "tokens_per_s"], r)) for r in rows]}
  if model:
    result.update(
        model_ms=model, model_packed_over_bf16=ratio(model["packed_xla"], model["bf16_dense"]),
        model_packed_over_fp32=ratio(model["packed_xla"], model["fp32_dense"]),
        bytes=sizes, hf_packed_over_bf16=sizes["hf_packed"] / sizes["bf16"],
        kernel_reads_over_bf16=sizes["kernel_reads"] / sizes["bf16"])
  emit_json(result)


if __name__ == "__main__":
  main()
