"""Peak host memory of quantizing a model larger than one wants to hold: streaming vs model size.

    .venv/bin/python benchmarks/bench_memory.py [--layers 12] [--hidden 2048] [--intermediate 5632]
        [--vocab 32000] [--nsamples 4] [--seqlen 64] [--workdir /tmp] [--keep]
        [--rotation none|hadamard|random]

1. Writes a synthetic float32 Llama (random weights, the shapes of a ~1B model; default about
   3 GB) as a sharded Hugging Face safetensors folder, one layer at a time (this process never
   holds more than one layer).
2. In a fresh process: ``scripts/quantize_llama.py`` (``--via cli``, the default: its streamed
   path, orbax checkpoint written, no evaluation) or ``gptq_jax.interop.quantize_folder``
   (``--via library``) quantizes it block by block (blocks
   read from the memory-mapped shards on demand, each quantized block written out at once) into a
   GPTQ folder, with fast settings (``--nsamples`` x ``--seqlen`` calibration tokens, 4-bit, group
   128, no true-sequential). Its peak RSS (VmHWM) is read after the imports (the JAX runtime
   alone) and after quantizing. It runs with glibc malloc told to return freed memory
   (``MALLOC_ENV`` below; ``--default-malloc`` to compare).
3. Checks that the output folder imports (``import_hf``) with every linear packed.

The CLI reads the embedding and the head by rows (a slice of the vocabulary at a time) and, with
``--rotation``, rotates each piece as it reads it; an embedding-heavy model (``--layers 6 --vocab
65536``: embedding and head are half of the model) is the case that measures it.

The baseline is the model's own size: an in-memory ``quantize(params, ...)`` holds at least the
whole float model (plus its quantized copy). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from _common import emit_json, log, peak_rss_mb, run_json, table

# glibc keeps freed blocks of the (large, short-lived) per-block buffers in its heap: without this,
# RSS creeps up by tens of MiB per block (fragmentation), with it it stays flat after block 0.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576",
              "MALLOC_ARENA_MAX": "2"}


def _config(args) -> dict:
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab,
      "hidden_size": args.hidden, "intermediate_size": args.intermediate,
      "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 128,
      "num_key_value_heads": args.hidden // 128, "head_dim": 128, "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
      "torch_dtype": "float32",
  }


def build_model(folder: str, args) -> int:
  """Writes the synthetic float32 Llama shard by shard; returns the weights' bytes."""
  from gptq_jax.models.safetensors_io import save_safetensors

  os.makedirs(folder)
  cfg = _config(args)
  h, m, v = args.hidden, args.intermediate, args.vocab
  rng = np.random.default_rng(0)
  normal = lambda *shape: (0.02 * rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
  ones = lambda: np.ones(h, np.float32)  # noqa: E731

  def shard(k: int) -> dict[str, np.ndarray]:
    if k == args.layers:
      return {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": ones(),
              "lm_head.weight": normal(v, h)}
    p = f"model.layers.{k}."
    return {**{p + f"self_attn.{x}_proj.weight": normal(h, h) for x in "qkvo"},
            p + "mlp.gate_proj.weight": normal(m, h), p + "mlp.up_proj.weight": normal(m, h),
            p + "mlp.down_proj.weight": normal(h, m), p + "input_layernorm.weight": ones(),
            p + "post_attention_layernorm.weight": ones()}

  weight_map, total, n = {}, 0, args.layers + 1
  for k in range(n):
    tensors = shard(k)  # one layer in memory at a time
    name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    save_safetensors(os.path.join(folder, name), tensors, metadata={"format": "pt"})
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update({t: name for t in tensors})
    del tensors
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  return total


def child(src: str, out: str, ids_path: str) -> None:
  """The measured process: streaming quantization of ``src`` into ``out``."""
  import jax

  import gptq_jax as gj
  from gptq_jax.interop import import_hf, quantize_folder

  jax.numpy.zeros(1).block_until_ready()
  rss_start = peak_rss_mb()
  ids = np.load(ids_path)
  cfg = gj.GPTQConfig(4, group_size=128, true_sequential=False, nsamples=len(ids),
                      seqlen=ids.shape[1])
  t0 = time.perf_counter()
  peaks = []  # peak RSS after each block: flat after the first when memory does not grow
  quantize_folder(src, ids, cfg, out, mesh=None, progress=False,
                  on_block_done=lambda i, block, records: peaks.append(peak_rss_mb()))
  seconds = time.perf_counter() - t0
  rss_peak = peak_rss_mb()
  _, qparams, _ = import_hf(out)  # the result loads (after the measurement)
  packed = sum(isinstance(x, gj.PackedWeight) for x in jax.tree.leaves(
      qparams, is_leaf=lambda x: isinstance(x, gj.PackedWeight)))
  out_bytes = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  emit_json({"rss_start_mb": rss_start, "rss_peak_mb": rss_peak, "seconds": seconds,
             "out_bytes": out_bytes, "packed_linears": packed, "peak_after_block_mb": peaks})


def child_cli(src: str, out: str, ids_path: str, rotation: str = "none") -> None:
  """The measured process is scripts/quantize_llama.py itself (the streamed CLI path): run it and
  read its own peak RSS (its report's ru_maxrss) and wall time."""
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ids = np.load(ids_path)
  report = out + ".report.json"
  cmd = [sys.executable, os.path.join(root, "scripts", "quantize_llama.py"), "--model", src,
         "--output", out, "--dataset", ids_path, "--nsamples", str(len(ids)), "--seqlen",
         str(ids.shape[1]), "--bits", "4", "--group-size", "128", "--no-true-sequential",
         "--eval-text", "none", "--sample-prompt", "", "--no-progress", "--report", report,
         "--dtype", "float32", "--rotation", rotation]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=os.environ, capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"quantize_llama.py failed:\n{proc.stderr[-3000:]}")
  with open(report) as f:
    rep = json.load(f)
  out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
  emit_json({"rss_start_mb": float("nan"), "rss_peak_mb": rep["peak_rss_mb"], "seconds": seconds,
             "out_bytes": out_bytes, "packed_linears": 7 * len({r["block"] for r in rep["layers"]}),
             "peak_after_block_mb": []})


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--intermediate", type=int, default=5632)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--nsamples", type=int, default=4)
  p.add_argument("--seqlen", type=int, default=64)
  p.add_argument("--workdir", default=tempfile.gettempdir())
  p.add_argument("--keep", action="store_true", help="keep the synthetic model and the output")
  p.add_argument("--default-malloc", action="store_true",
                 help="run the quantizing process with glibc's default malloc settings")
  p.add_argument("--via", default="cli", choices=("cli", "library"),
                 help="measure scripts/quantize_llama.py (default) or interop.quantize_folder")
  p.add_argument("--child", nargs=3, metavar=("SRC", "OUT", "IDS"), help=argparse.SUPPRESS)
  p.add_argument("--rotation", default="none", choices=("none", "hadamard", "random"),
                 help="--via cli: quantize with the residual stream rotated (rotated as read)")
  p.add_argument("--child-cli", nargs=4, metavar=("SRC", "OUT", "IDS", "ROT"),
                 help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    child(*args.child)
    return
  if args.child_cli:
    child_cli(*args.child_cli)
    return
  if args.hidden % 128:
    raise SystemExit(f"--hidden {args.hidden} must be a multiple of 128 (head_dim 128)")
  work = tempfile.mkdtemp(prefix="bench_memory_", dir=args.workdir)
  src, out, ids_path = (os.path.join(work, n) for n in ("float", "gptq", "ids.npy"))
  try:
    log(f"writing a synthetic Llama to {src} ...")
    t0 = time.perf_counter()
    model_bytes = build_model(src, args)
    log(f"  {model_bytes / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s; quantizing ...")
    rng = np.random.default_rng(1)
    np.save(ids_path, rng.integers(0, args.vocab, (args.nsamples, args.seqlen)).astype(np.int32))
    env = {"XLA_FLAGS": ""} if args.default_malloc else {"XLA_FLAGS": "", **MALLOC_ENV}
    child_args = ["--child-cli", src, out, ids_path, args.rotation] if args.via == "cli" else [
        "--child", src, out, ids_path]
    if args.via == "library" and args.rotation != "none":
      raise SystemExit("--rotation is measured through the CLI (--via cli)")
    r = run_json(sys.executable, os.path.abspath(__file__), child_args, env=env)
    h, m = args.hidden, args.intermediate
    block_mb = (4 * h * h + 3 * h * m + 2 * h) * 4 / 2**20
    embed_mb = args.vocab * h * 4 / 2**20
    model_mb = model_bytes / 2**20
    rows = [["float model (safetensors)", model_mb], ["one float block", block_mb],
            ["embedding (read by rows, not kept)", embed_mb],
            ["RSS after imports (JAX runtime)", r["rss_start_mb"]],
            ["peak RSS while quantizing", r["rss_peak_mb"]],
            ["GPTQ folder written", r["out_bytes"] / 2**20]]
    print(table(["what", "MiB"], rows))
    emb = 2 * embed_mb / model_mb
    print(f"via {args.via} (rotation {args.rotation}; embedding + head {emb:.0%} of the model): "
          f"peak RSS / model size = {r['rss_peak_mb'] / model_mb:.3f}; quantized in "
          f"{r['seconds']:.0f} s; peak RSS after each block (MiB): "
          + " ".join(f"{v:.0f}" for v in r["peak_after_block_mb"]))
    emit_json({"model_mb": model_mb, "block_mb": block_mb, "embed_mb": embed_mb,
               "rss_start_mb": r["rss_start_mb"], "rss_peak_mb": r["rss_peak_mb"],
               "peak_rss_over_model": r["rss_peak_mb"] / model_mb,
               "peak_rss_over_block": r["rss_peak_mb"] / block_mb,
               "quantize_seconds": r["seconds"], "packed_linears": r["packed_linears"],
               "peak_after_first_block_mb": (r["peak_after_block_mb"] or [None])[0],
               "peak_after_block_mb": r["peak_after_block_mb"], "out_mb": r["out_bytes"] / 2**20,
               "layers": args.layers, "hidden": h, "intermediate": m, "vocab": args.vocab,
               "nsamples": args.nsamples, "seqlen": args.seqlen,
               "malloc_env": {} if args.default_malloc else MALLOC_ENV, "via": args.via,
               "rotation": args.rotation, "embedding_and_head_fraction": emb})
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
