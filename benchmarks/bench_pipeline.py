"""End-to-end GPTQ of an embedded model: gptq_jax.quantize vs GPTQModel, same calibration tokens, same run.

    .venv/bin/python benchmarks/bench_pipeline.py [--model smollm2-135m|gemma3-270m|synthetic-moe]
        [--nsamples 64] [--seqlen 512] [--eval-windows 40] [--desc-act off|on|both] [--batch-size 8]
        [--no-baseline]

`--model synthetic-moe`: a mixture of experts written with transformers' own `Qwen3MoeConfig` and
random weights (seed 0; transformers' initialization, its router included): 8 blocks, hidden 1024,
16 heads (4 KV heads), 32 experts of width 512, top-4 (renormalized), SmolLM2's vocabulary and
tokenizer (for the text calibration); both sides quantize that float32 folder. Its perplexities
are those of a random model: only their relative increases compare.

Calibration: `--nsamples` random `--seqlen`-token windows of the bundled State of the Union
addresses 1990-2015 (`gptq_jax.data.text_calib_batches(sotu_texts("calib"), ...)`, seed 0), saved
once as a token array that both sides use as is. Evaluation: the first `--eval-windows`
non-overlapping `--seqlen` windows of the held-out addresses 2016-2021 (`sotu_texts("eval")`).
When the tokenizer asks for `<bos>` (Gemma), every calibration and evaluation window starts with it
(`<bos>` + `seqlen - 1` text tokens), on both sides.
Config on both sides: 4-bit, group 128, sym, damp_percent 0.1 (damp_auto_increment 0.01),
true-sequential, no static groups, mse 0 (plain min/max grid), act_group_aware = not desc_act
(GPTQModel's own defaults differ: damp 0.05, offload to disk on; both are set as here).

Each side runs in its own process so its wall time and peak RSS are its own:
- gptq_jax (.venv): load the embedded model, `gptq_jax.quantize(params, calib, cfg)` timed alone
  (compilation included), peak RSS read right after it; then perplexity of the float model, of
  round-to-nearest (same grid) and of the GPTQ result (packed kernels dequantized to float32);
- GPTQModel (.venv-gptqmodel, benchmarks/baselines/gptqmodel_pipeline.py): the same weights
  written as a float32 Hugging Face folder (`save_hf_folder`) with the tokenizer, `quantize()` timed
  alone, peak RSS, then the saved GPTQ folder reloaded with its torch kernel and evaluated on the
  same windows in torch (and the float folder, to cross-check the two evaluators).
With `--cli`, the whole `scripts/quantize_llama.py` process (start, load, calibration, quantize,
orbax checkpoint and `--save-hf` folder; no evaluation, no sample) is timed from outside against
GPTQModel's load + quantize + save, and the CLI's `--breakdown` is printed: seconds per phase
(embedding, reads, Hessian passes, solves, propagation, writes, compilation) and the work of the
passes per block, as matmul FLOPs in block forwards (1 = every matmul of a block once). With `--cli-only --repeat N` the two processes
alternate N times (GPTQModel, ours, GPTQModel, ours, ...) and each round's ratio, the load average
around it and the median are printed: on a shared machine one pair is not a fair figure.
Last line: one JSON object with the figures, the perplexity increases and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (BASELINES, GPTQMODEL_PYTHON, emit_json, gptqmodel_available, log,  # noqa: E402
                     peak_rss_mb, ratio, run_json, table)

MODELS = ("smollm2-135m", "gemma3-270m", "synthetic-moe")
SYNTHETIC = {"synthetic-moe": dict(
    hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, intermediate_size=2048,
    norm_topk_prob=True, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False)}


def tokenizer_of(model: str) -> str:
  """The embedded model whose tokenizer a model uses (a synthetic one: SmolLM2's)."""
  return MODELS[0] if model in SYNTHETIC else model


def write_synthetic(folder: str, model: str, tok) -> None:
  """The synthetic model as a float32 HF folder, written by transformers itself."""
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.Qwen3MoeConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, **SYNTHETIC[model])
  transformers.Qwen3MoeForCausalLM(config).save_pretrained(folder)
  tok.save_pretrained(folder)


def model_spec(workdir: str, model: str) -> str:
  """What load_model reads for ``model``: the written folder of a synthetic model."""
  return os.path.join(workdir, "hf") if model in SYNTHETIC else model
DAMP = 0.1
GPTQMODEL_ENV = {"TORCH_COMPILE_DISABLE": "1", "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1",
                 "TRANSFORMERS_OFFLINE": "1", "XLA_FLAGS": ""}


def prepare(workdir: str, args) -> None:
  """calib.npy [nsamples, seqlen], eval.npy [windows * seqlen], and the float HF folder."""
  from gptq_jax import data
  from gptq_jax.models import load_llama, load_tokenizer, save_hf_folder

  tok = load_tokenizer(tokenizer_of(args.model))
  batches = data.text_calib_batches(data.sotu_texts("calib"), tok, nsamples=args.nsamples,
                                    seqlen=args.seqlen, seed=0, batch_size=args.nsamples)
  ids = np.concatenate([b["input_ids"] for b in batches])
  assert all(b["attention_mask"].all() for b in batches)  # full windows: no padding
  np.save(os.path.join(workdir, "calib.npy"), ids)
  tokens = data.tokenize_text(data.sotu_texts("eval"), tok)
  bos = data.bos_token_id(tok)  # evaluation windows [n, seqlen], <bos> first if the tokenizer wants
  if bos is not None:
    tokens = tokens[1:] if tokens[0] == bos else tokens
    n = min(args.eval_windows, tokens.shape[0] // (args.seqlen - 1))
    windows = tokens[: n * (args.seqlen - 1)].reshape(n, args.seqlen - 1)
    windows = np.concatenate([np.full((n, 1), bos, windows.dtype), windows], axis=1)
  else:
    n = min(args.eval_windows, tokens.shape[0] // args.seqlen)
    windows = tokens[: n * args.seqlen].reshape(n, args.seqlen)
  np.save(os.path.join(workdir, "eval.npy"), windows)
  with open(os.path.join(workdir, "eval_bos.json"), "w") as f:
    json.dump(bos, f)
  if args.model in SYNTHETIC:  # both sides read this folder
    write_synthetic(os.path.join(workdir, "hf"), args.model, tok)
  elif not args.no_baseline:
    cfg, params = load_llama(args.model)
    save_hf_folder(os.path.join(workdir, "hf"), cfg, params)
    tok.save_pretrained(os.path.join(workdir, "hf"))


def side_ours(workdir: str, desc_act: bool, seqlen: int, batch_size: int, model: str) -> None:
  """Runs in its own process: prints our figures as one JSON line."""
  import gptq_jax as gj
  from gptq_jax.eval import perplexity
  from gptq_jax.models import load_model
  from gptq_jax.pipeline import dense_block, quantize, rtn_model

  calib = np.load(os.path.join(workdir, "calib.npy"))
  windows = np.load(os.path.join(workdir, "eval.npy"))  # [n, seqlen]
  with open(os.path.join(workdir, "eval_bos.json")) as f:
    bos = json.load(f)
  tokens = (windows[:, 1:] if bos is not None else windows).reshape(-1)
  t0 = time.perf_counter()
  cfg, params = load_model(model_spec(workdir, model))
  load_s = time.perf_counter() - t0
  rss_loaded = peak_rss_mb()
  qcfg = gj.GPTQConfig(4, group_size=128, sym=True, desc_act=desc_act,
                       act_group_aware=not desc_act, damp_percent=DAMP, damp_auto_increment=0.01,
                       true_sequential=True, static_groups=False, mse=0.0, format="gptq")
  t0 = time.perf_counter()
  qparams = quantize(params, calib, qcfg, model_config=cfg, mesh=None, progress=False,
                     batch_size=batch_size)
  quantize_s = time.perf_counter() - t0
  rss = peak_rss_mb()

  eval_batch = 4 if cfg.vocab_size <= 65536 else 1  # Gemma's 262k-way logits: 0.5 GB per window
  ppl = lambda p: perplexity(p, cfg, tokens, seqlen=seqlen, batch_size=eval_batch,  # noqa: E731
                             bos_token_id=bos)
  t0 = time.perf_counter()
  result = {"quantize_s": quantize_s, "peak_rss_mb": rss, "rss_before_quantize_mb": rss_loaded,
            "load_s": load_s, "ppl_gptq": ppl(dense_block(qparams)), "ppl_float": ppl(params),
            "ppl_rtn": ppl(dense_block(rtn_model(params, qcfg, model_config=cfg)))}
  log(f"gptq_jax side: quantize {quantize_s:.1f}s, evaluation {time.perf_counter() - t0:.1f}s")
  emit_json(result)


def run_cli(workdir: str, desc_act: bool, args) -> dict:
  """The whole quantize_llama.py process on the same calibration tokens, timed from outside."""
  import json
  import subprocess

  tag = "on" if desc_act else "off"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for old in (f"cli_{tag}", f"cli_hf_{tag}"):  # an earlier --repeat round's outputs
    shutil.rmtree(os.path.join(workdir, old), ignore_errors=True)
  report = os.path.join(workdir, f"cli_{tag}.json")
  cmd = [sys.executable, os.path.join(root, "scripts", "quantize_llama.py"),
         "--model", model_spec(workdir, getattr(args, "model", None) or "smollm2-135m"),
         "--output", os.path.join(workdir, f"cli_{tag}"),
         "--save-hf", os.path.join(workdir, f"cli_hf_{tag}"), "--report", report,
         "--dataset", os.path.join(workdir, "calib.npy"), "--nsamples", str(args.nsamples),
         "--seqlen", str(args.seqlen), "--bits", "4", "--group-size", "128", "--damp-percent",
         str(DAMP), "--desc-act" if desc_act else "--no-desc-act",
         "--no-act-group-aware" if desc_act else "--act-group-aware",
         "--batch-size", str(args.batch_size), "--eval-text", "none", "--sample-prompt", "",
         "--no-progress", "--breakdown"]
  env = {**os.environ, "XLA_FLAGS": ""}
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"quantize_llama.py failed:\n{proc.stderr[-3000:]}")
  with open(report) as f:
    rep = json.load(f)
  return {"wall_s": wall, "inside_s": rep["seconds"], "peak_rss_mb": rep["peak_rss_mb"],
          "breakdown": rep["breakdown"]}


def _fresh(workdir: str, name: str) -> str:
  """``workdir/name`` with an earlier --repeat round's output removed."""
  path = os.path.join(workdir, name)
  shutil.rmtree(path, ignore_errors=True)
  return path


def run_case(workdir: str, desc_act: bool, args) -> dict:
  tag = "on" if desc_act else "off"
  ours = None
  if not args.cli_only:
    log(f"desc_act {tag}: gptq_jax ...")
    ours = run_json(sys.executable, os.path.abspath(__file__),
                    ["--side", "ours", "--workdir", workdir, "--desc-act", tag, "--seqlen",
                     args.seqlen, "--batch-size", args.batch_size, "--model", args.model])
  base = None
  loads = {"before_baseline": os.getloadavg()}
  if not args.no_baseline:
    log(f"desc_act {tag}: GPTQModel ...")
    base = run_json(GPTQMODEL_PYTHON, os.path.join(BASELINES, "gptqmodel_pipeline.py"),
                    [os.path.join(workdir, "hf"), os.path.join(workdir, "calib.npy"),
                     os.path.join(workdir, "eval.npy"), _fresh(workdir, f"gptqmodel_{tag}"),
                     "--seqlen", args.seqlen, "--desc-act", int(desc_act), "--damp", DAMP,
                     "--batch-size", args.batch_size], env=GPTQMODEL_ENV)
  if args.cli:
    log(f"desc_act {tag}: quantize_llama.py ...")
  loads["before_cli"] = os.getloadavg()
  cli = run_cli(workdir, desc_act, args) if args.cli else None
  loads["after_cli"] = os.getloadavg()
  inc = lambda q, f: q / f - 1  # noqa: E731  (relative perplexity increase)
  if ours is None:  # --cli-only: the whole processes, no evaluation on our side
    case = {"cli": cli, "baseline": base}
    if base is not None and "save_s" in base:
      base_total = base["load_s"] + base["quantize_s"] + base["save_s"]
      case.update(baseline_load_quantize_save_s=base_total,
                  cli_wall_ratio=ratio(cli["wall_s"], base_total))
    case["loadavg"] = loads
    return case
  case = {"ours": ours, "cli": cli, "ppl_increase": inc(ours["ppl_gptq"], ours["ppl_float"]),
          "rtn_ppl_increase": inc(ours["ppl_rtn"], ours["ppl_float"])}
  if base is not None:
    float_ref = base.get("ppl_float", ours["ppl_float"])
    case.update(
        baseline=base, baseline_ppl_increase=inc(base["ppl_gptq"], float_ref),
        wall_ratio=ratio(ours["quantize_s"], base["quantize_s"]),
        rss_ratio=ratio(ours["peak_rss_mb"], base["peak_rss_mb"]),
        evaluators_float_ppl_rel_diff=(base["ppl_float"] / ours["ppl_float"] - 1
                                       if "ppl_float" in base else None))
    if cli is not None and "save_s" in base:
      base_total = base["load_s"] + base["quantize_s"] + base["save_s"]
      case.update(baseline_load_quantize_save_s=base_total,
                  cli_wall_ratio=ratio(cli["wall_s"], base_total))
    # Must: our perplexity increase no worse than GPTQModel's + 2 % (points of relative ppl).
    case["quality_ok"] = case["ppl_increase"] <= case["baseline_ppl_increase"] + 0.02
  return case


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default=MODELS[0], help=f"an embedded model {MODELS} or a model spec")
  ap.add_argument("--nsamples", type=int, default=64)
  ap.add_argument("--seqlen", type=int, default=512)
  ap.add_argument("--eval-windows", type=int, default=40)
  ap.add_argument("--desc-act", default="off", choices=("off", "on", "both"))
  ap.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward")
  ap.add_argument("--no-baseline", action="store_true")
  ap.add_argument("--cli", action="store_true",
                  help="also time the whole quantize_llama.py process (vs GPTQModel load + "
                       "quantize + save) and print its breakdown")
  ap.add_argument("--cli-only", action="store_true",
                  help="with --cli: skip the in-process gptq_jax side (and its evaluation)")
  ap.add_argument("--repeat", type=int, default=1,
                  help="with --cli-only: alternate GPTQModel and quantize_llama.py this many "
                       "times (the spread of the ratio on a shared machine)")
  ap.add_argument("--side", choices=("ours",), help=argparse.SUPPRESS)
  ap.add_argument("--workdir", help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.cli = args.cli or args.cli_only
  if args.side == "ours":
    return side_ours(args.workdir, args.desc_act == "on", args.seqlen, args.batch_size, args.model)

  if not args.no_baseline:
    ok, why = gptqmodel_available()
    if not ok:
      log(f"GPTQModel baseline unavailable ({why}): gptq_jax figures only")
      args.no_baseline = True
  cases = {"off": [False], "on": [True], "both": [False, True]}[args.desc_act]
  results = {}
  with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as workdir:
    prepare(workdir, args)
    n_eval = np.load(os.path.join(workdir, "eval.npy")).shape[0]
    rounds = args.repeat if args.cli_only else 1
    for desc_act in cases:
      for r in range(rounds):
        name = "desc_act_" + ("on" if desc_act else "off") + (f"_round{r + 1}" if rounds > 1 else "")
        results[name] = run_case(workdir, desc_act, args)

  rows = []
  for name, c in results.items():
    if c.get("ours") is None:
      continue
    o, b = c["ours"], c.get("baseline")
    rows.append((name, "gptq_jax", o["quantize_s"], o["peak_rss_mb"], o["ppl_float"],
                 o["ppl_gptq"], f"{c['ppl_increase']:+.2%}", o["ppl_rtn"],
                 f"{c['rtn_ppl_increase']:+.2%}"))
    if b is not None:
      rows.append((name, "GPTQModel", b["quantize_s"], b["peak_rss_mb"], b.get("ppl_float", "-"),
                   b["ppl_gptq"], f"{c['baseline_ppl_increase']:+.2%}", "-", "-"))
  print(f"{args.model}, {args.nsamples} x {args.seqlen} calibration tokens (SOTU 1990-2015), "
        f"4-bit g128 sym damp {DAMP}; perplexity on {n_eval} x {args.seqlen} held-out tokens "
        f"(SOTU 2016-2021)")
  print(table(("case", "library", "quantize s", "peak RSS MiB", "ppl float", "ppl GPTQ",
               "increase", "ppl RTN", "RTN increase"), rows))
  for name, c in results.items():
    if "wall_ratio" in c:
      print(f"{name}: wall gptq_jax/GPTQModel {c['wall_ratio']:.3f}, peak RSS ratio "
            f"{c['rss_ratio']:.3f}, quality must (increase <= GPTQModel's + 2%): "
            f"{'met' if c['quality_ok'] else 'NOT met'}")
  for name, c in results.items():
    if c.get("cli") is not None:
      b = c["cli"]["breakdown"]
      print(f"{name}: quantize_llama.py process {c['cli']['wall_s']:.1f} s wall (peak RSS "
            f"{c['cli']['peak_rss_mb']:.0f} MiB)"
            + (f" vs GPTQModel load + quantize + save {c['baseline_load_quantize_save_s']:.1f} s"
               f" = {c['cli_wall_ratio']:.3f}x" if "cli_wall_ratio" in c else "")
            + ("; load average (1 min) before GPTQModel {:.1f}, before ours {:.1f}, after ours "
               "{:.1f}".format(c["loadavg"]["before_baseline"][0], c["loadavg"]["before_cli"][0],
                               c["loadavg"]["after_cli"][0]) if "loadavg" in c else ""))
      print("  breakdown (s): " + ", ".join(f"{k} {v:.2f}" for k, v in b["seconds"].items()))
      print(f"  block forwards per block, as matmul work: {b['block_forwards_per_block']:.2f} "
            f"(every matmul once: {b['minimum_block_forwards_per_block']:.0f}), in "
            f"{b.get('passes_per_block', float('nan')):.2f} passes; kept inputs: "
            f"{b.get('stash')}")
  wall_ratios = [c["cli_wall_ratio"] for c in results.values() if c.get("cli_wall_ratio")]
  if len(wall_ratios) > 1:
    print(f"quantize_llama.py / GPTQModel over {len(wall_ratios)} alternating rounds: median "
          f"{statistics.median(wall_ratios):.3f}x, min {min(wall_ratios):.3f}x, max "
          f"{max(wall_ratios):.3f}x")
  emit_json({"bench": "pipeline", "model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
             "eval_windows": n_eval, "batch_size": args.batch_size, "bits": 4, "group_size": 128,
             "sym": True, "damp_percent": DAMP, "mse": 0.0, "true_sequential": True,
             "loadavg": os.getloadavg(), "results": results})


if __name__ == "__main__":
  main()
