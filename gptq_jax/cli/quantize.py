"""``scripts/quantize_llama.py``: quantize a decoder checkpoint (any supported family) with GPTQ,
resumably, with a report.

Flags are named after the GPTQConfig fields. The run streams (``cli/stream.py``, docs/scale.md):
open the model lazily (weights stay memory-mapped on the host), build the calibration batches,
quantize block by block with one block at a time on the devices — each finished block saved under
``<output>.partial`` so ``--resume`` continues a killed run, and the held-out windows carried
through the float and the quantized block in the same pass for the perplexity before / after —
then write the orbax checkpoint (and a Hugging Face GPTQ folder with ``--save-hf``), print a sample
generation, and write the ``--report`` JSON (and a PNG plot of the loss per layer beside it).
Under ``jax.distributed`` every process feeds its share of the calibration samples and process 0
writes the files.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time

from gptq_jax.cli import compile_cache
from gptq_jax.config import BACKENDS, FORMATS, MSE_WEIGHTS, GPTQConfig
from gptq_jax.data import DatasetUnavailable


CALIB_DEFAULT = "bundled State of the Union addresses 1990-2015 (gptq_jax/assets/sotu)"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="quantize_llama.py", description="GPTQ-quantize a decoder LLM: Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 3 (offline).")
  p.add_argument("--model", default="smollm2-135m",
                 help="HF folder, .gguf file, or an embedded model: 'smollm2-135m' (the default), "
                      "'gemma3-270m'")
  p.add_argument("--output", required=True, help="new folder for the orbax checkpoint")
  p.add_argument("--resume", action="store_true",
                 help="continue an interrupted run writing the same --output")
  p.add_argument("--save-hf", metavar="DIR", help="also export a Hugging Face GPTQ folder")
  p.add_argument("--report", metavar="FILE.json",
                 help="write a JSON report (and FILE.png: loss per layer)")
  g = p.add_argument_group("GPTQ settings (GPTQConfig fields)")
  g.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8")
  g.add_argument("--group-size", type=int, default=128, help="> 0, or -1 for per-row")
  g.add_argument("--damp-percent", type=float, default=0.1)
  g.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False)
  g.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=None,
                 help="GAR (default on; off with --desc-act)")
  g.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
  g.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True)
  g.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=False)
  g.add_argument("--format", default="gptq", choices=FORMATS)
  g.add_argument("--backend", default=None, choices=BACKENDS)
  g.add_argument("--mse", type=float, default=0.0,
                 help="clipping search norm (0 = off; 2.4 in the references)")
  g.add_argument("--mse-weight", default="none", choices=MSE_WEIGHTS,
                 help="clipping search error in GPTQ: none (the references') or hessian (each "
                      "column's error over its inverse-Hessian factor diagonal)")
  g.add_argument("--refine-steps", type=int, default=0,
                 help="optax block-wise refinement: Adam steps per block after GPTQ (0 = off; "
                 "40 in the README's table)")
  g.add_argument("--refine-lr", type=float, default=5e-3, help="refinement learning rate")
  g.add_argument("--refine-rounding", action=argparse.BooleanOptionalAction, default=False,
                 help="refinement also learns a rounding offset per weight (AutoRound-style)")
  g.add_argument("--block-size", type=int, default=128, help="lazy-update block (columns)")
  g.add_argument("--dynamic", default=None, metavar="JSON|FILE",
                 help="per-module precision as GPTQModel's dynamic: a JSON object (or a .json "
                      "file) {regex: {bits, group_size, sym, desc_act, mse}}; '-:regex' keeps "
                      "matching modules float (names like model.layers.3.mlp.down_proj)")
  g.add_argument("--lm-head", action=argparse.BooleanOptionalAction, default=False,
                 help="also GPTQ-quantize the output projection (a tied embedding is untied)")
  g.add_argument("--gptaq", action=argparse.BooleanOptionalAction, default=False,
                 help="GPTAQ: also match the float model's inputs (asymmetric calibration)")
  g.add_argument("--gptaq-alpha", type=float, default=0.25, help="GPTAQ's correction weight")
  g.add_argument("--rotation", default="none", choices=("none", "hadamard", "random"),
                 help="rotate the residual stream by an orthogonal matrix before quantizing")
  d = p.add_argument_group("calibration and evaluation")
  d.add_argument("--dataset", default=None,
                 help="wikitext2 | c4 | c4-new | a .txt file or folder | a .npy [n, seqlen] token "
                      "array (default: the bundled State of the Union text, 1990-2015)")
  d.add_argument("--nsamples", type=int, default=128)
  d.add_argument("--seqlen", type=int, default=2048)
  d.add_argument("--seed", type=int, default=0)
  d.add_argument("--batch-size", type=int, default=None, help="calibration samples per forward")
  d.add_argument("--eval-text", default=None,
                 help="text for perplexity before/after (default: the bundled 2016-2021 "
                      "addresses, held out from calibration); 'none' to skip")
  d.add_argument("--eval-windows", type=int, default=16, help="windows of --seqlen to score")
  d.add_argument("--sample-prompt", default="The state of the union is",
                 help="prompt for a sample generation after quantization ('' to skip)")
  p.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                 help="dtype of the weights and the calibration forward (default: the "
                      "checkpoint's own; Hessians are always accumulated in float32)")
  p.add_argument("--no-progress", action="store_true", help="no progress line")
  p.add_argument("--breakdown", action="store_true",
                 help="time each phase exactly (waits for the devices at each phase's end) and "
                      "print where the time went")
  m = p.add_argument_group("several hosts (jax.distributed; automatic on a multi-host TPU slice)")
  m.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
  m.add_argument("--num-processes", type=int, help="how many processes take part")
  m.add_argument("--process-id", type=int, help="this process's index in [0, --num-processes)")
  compile_cache.add_flag(p)
  return p


def _config(args) -> GPTQConfig:
  kw = dict(group_size=args.group_size, damp_percent=args.damp_percent, desc_act=args.desc_act,
            sym=args.sym, true_sequential=args.true_sequential, static_groups=args.static_groups,
            format=args.format, backend=args.backend, mse=args.mse, mse_weight=args.mse_weight,
            block_size=args.block_size,
            refine_steps=args.refine_steps, refine_lr=args.refine_lr,
            refine_rounding=args.refine_rounding,
            gptaq=args.gptaq, gptaq_alpha=args.gptaq_alpha, rotation=args.rotation,
            nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
  if args.act_group_aware is not None:
    kw["act_group_aware"] = args.act_group_aware
  elif args.desc_act:
    kw["act_group_aware"] = False
  if args.dynamic is not None:  # a JSON string, or a file holding one
    kw["dynamic"] = (open(args.dynamic).read() if os.path.isfile(args.dynamic)  # noqa: SIM115
                     else args.dynamic)
  kw["lm_head"] = args.lm_head
  if args.dataset is not None and args.dataset.endswith(".npy"):
    kw["dataset"] = os.path.abspath(args.dataset)
  elif args.dataset is not None:
    kw["dataset"] = args.dataset
  return GPTQConfig(args.bits, **kw)


def _check_creatable(flag: str, path: str) -> None:
  """Missing parent folders are created when the run writes; the nearest existing one must be a
  writable folder."""
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(f"{flag} {path!r}: {parent!r} is a file, not a folder")
  if not os.access(parent, os.W_OK):
    raise PermissionError(f"{flag} {path!r}: the folder {parent!r} is not writable")


def _check_args(args) -> None:
  """Everything that can be checked before loading the model: a bad value fails in a second,
  before anything is written."""
  from gptq_jax.models import resolve_model_spec  # noqa: PLC0415

  resolve_model_spec(args.model)  # a missing model or a hub id fails here, before any work
  if os.path.exists(args.output):
    raise FileExistsError(f"--output {args.output!r} already exists: choose another folder "
                          "(nothing was overwritten)")
  if args.save_hf and os.path.exists(args.save_hf):
    raise FileExistsError(f"--save-hf {args.save_hf!r} already exists: choose another folder")
  for flag, path in (("--output", args.output), ("--report", args.report),
                     ("--save-hf", args.save_hf)):
    if path:
      _check_creatable(flag, path)
  if args.report and not args.report.endswith(".json"):
    raise ValueError(f"--report {args.report!r} must end with .json (the plot goes beside it "
                     "as .png)")
  if (args.eval_text or "none").lower() != "none" and not os.path.exists(args.eval_text):
    raise FileNotFoundError(f"--eval-text {args.eval_text!r} does not exist (pass a .txt file or "
                            "a folder of .txt files, or 'none' to skip perplexity)")
  for flag, value, low in (("--seqlen", args.seqlen, 2), ("--eval-windows", args.eval_windows, 1),
                           ("--batch-size", args.batch_size, 1)):
    if value is not None and value < low:
      raise ValueError(f"{flag}={value} is invalid: expected an integer >= {low}")
  if args.save_hf:
    try:
      import gptq_jax.interop  # noqa: F401,PLC0415 (optional: only --save-hf needs it)
    except ImportError as e:
      raise ValueError(f"--save-hf is unavailable in this installation ({e})") from None


SAMPLE_TOKENS = 32


def _sample(evaluation, params, model_config, tokenizer, prompt: str) -> str:
  """A greedy continuation, cut at the first special token (an instruct model's end of turn)."""
  ids = tokenizer(prompt)["input_ids"]
  new = evaluation.generate(params, model_config, ids, max_new_tokens=SAMPLE_TOKENS)[len(ids):]
  special = set(getattr(tokenizer, "all_special_ids", []) or [])
  cut = next((k for k, t in enumerate(new.tolist()) if t in special), len(new))
  return tokenizer.decode(new[:cut], skip_special_tokens=True)


def _say(msg: str) -> None:
  import jax

  if jax.process_index() == 0 or msg.startswith("process "):
    print(msg, file=sys.stderr, flush=True)


def init_distributed(args) -> None:
  """Join a ``jax.distributed`` job: with ``--coordinator`` (CPU collectives through gloo), or on
  its own on a multi-host TPU slice. Must run before anything touches a device."""
  import jax

  given = [args.coordinator is not None, args.num_processes is not None,
           args.process_id is not None]
  if any(given) and not all(given):
    raise ValueError("--coordinator, --num-processes and --process-id go together (a "
                     "multi-host TPU slice needs none of them)")
  if all(given):
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
      raise ValueError(f"--process-id {args.process_id} must be in [0, --num-processes "
                       f"{args.num_processes})")
    if args.num_processes == 1:
      return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=300)
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice
    jax.distributed.initialize()


def save_checkpoint(path: str, params, *, model_config, quant_config, tokenizer, extra) -> None:
  """``checkpoint.save`` on one process. Under ``jax.distributed`` the orbax save is collective
  (every process calls it; orbax's primary process writes the files and they meet at barriers),
  and process 0 alone writes the tokenizer and moves the finished folder into place."""
  import jax

  from gptq_jax import checkpoint

  if jax.process_count() == 1:
    checkpoint.save(path, params, model_config=model_config, quant_config=quant_config,
                    tokenizer=tokenizer, extra=extra)
    return
  import shutil

  from jax.experimental import multihost_utils

  path, primary = os.path.abspath(path), jax.process_index() == 0
  tmp = path + ".saving"
  if primary and os.path.exists(tmp):
    shutil.rmtree(tmp)  # a save that was killed midway
  multihost_utils.sync_global_devices("gptq_jax save: start")
  meta = {"model_config": model_config.to_hf_dict(),  # as checkpoint.save writes it
          "compute_dtype": getattr(model_config, "dtype", "float32"),
          "quant_config": quant_config.to_dict(), **extra}
  checkpoint.write_tree(os.path.join(tmp, "orbax"), 0, params, meta)
  if primary and tokenizer is not None:
    tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    os.rename(tmp, path)
  multihost_utils.sync_global_devices("gptq_jax save: done")


SAMPLE_BEFORE_MAX_BYTES = 2 << 30  # the float sample needs the whole float model: small ones only


def _calibration(args, cfg, tokenizer):
  from gptq_jax import data

  sizes = dict(nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed,
               batch_size=args.batch_size or 1)
  if cfg.dataset is None:  # offline default: the bundled addresses 1990-2015
    return data.text_calib_batches(data.sotu_texts("calib"), tokenizer, **sizes)
  return data.get_calib_batches(cfg.dataset, tokenizer, **sizes)


def _tokenizer(args, load_tokenizer):
  """The model's tokenizer; a folder without one still runs when nothing needs it (token ids from
  a .npy, no evaluation text, no sample): the outputs then carry no tokenizer files."""
  try:
    return load_tokenizer(args.model)
  except ValueError as e:
    needless = ((args.dataset or "").endswith(".npy") and not args.sample_prompt
                and (args.eval_text or "").lower() == "none")
    if not needless:
      raise
    _say(f"no tokenizer ({e}); not needed with token ids from {args.dataset}: going on without")
    return None


def _fingerprint(source, model_config, cfg, samples, dtype: str) -> dict:
  from gptq_jax.cli.stream import source_digest
  from gptq_jax.pipeline.resume import calibration_digest

  qc = cfg.to_dict()
  qc.pop("backend", None)  # how the result is run later does not change it
  return {"model": {"config": model_config.to_hf_dict(), "weights": source_digest(source.files),
                    "dtype": dtype},
          "quant_config": qc, "calibration": calibration_digest(samples)}


def _host(tree):
  """A pytree's arrays copied to host numpy (PackedWeight nodes kept): copies, so that no view
  keeps a device buffer alive."""
  import jax
  import numpy as np

  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _breakdown(stats, eval_seconds: dict, timing: dict, total: float, nblocks: int,
               skipped: int) -> dict:
  """Where the run's time went (seconds per phase) and how many block forwards it ran."""
  s = stats.summary()
  ph = s["seconds"]
  seconds = {"open model and tokenizer": timing.get("open model and tokenizer", 0.0),
             "calibration tokens": timing.get("calibration tokens", 0.0),
             "embedding": ph.get("embedding", 0.0),
             "read blocks (I/O)": max(0.0, ph.get("read blocks", 0.0) - eval_seconds["get"]),
             "hessian passes": ph.get("hessian passes", 0.0),
             "solves": ph.get("solves", 0.0),
             "propagation": ph.get("propagation", 0.0),
             "write blocks (I/O)": ph.get("write blocks", 0.0),
             "evaluation (streamed)": (sum(eval_seconds.values())
                                       + timing.get("final norm, logits", 0.0)),
             "save and export (I/O)": timing.get("write", 0.0),
             "samples": timing.get("sample_before", 0.0) + timing.get("sample_after", 0.0)}
  seconds["other"] = max(0.0, total - sum(seconds.values()))
  seconds["of which compilation"] = s["compile_seconds"]
  n = max(1, s["counts"].get("blocks quantized", 0))
  passes = s["counts"].get("hessian passes", 0) + s["counts"].get("propagation passes", 0)
  return {"seconds": seconds, "counts": s["counts"],
          "block_forwards_per_block": passes / n,
          # one pass per subset whose input depends on an earlier subset (o, gate/up, down) and
          # one propagation that can carry the next block's first subset (q/k/v).
          "minimum_block_forwards_per_block": 4}


def run(args) -> dict:
  import jax
  import jax.numpy as jnp

  from gptq_jax import checkpoint, data, eval as evaluation
  from gptq_jax.cli import report as report_lib
  from gptq_jax.cli.stream import EvalStream, ModelSource, StreamedRun, eval_windows
  from gptq_jax.models import load_tokenizer
  from gptq_jax.pipeline import quantize
  from gptq_jax.pipeline.adapter import ModelAdapter
  from gptq_jax.pipeline.calib import normalize
  from gptq_jax.pipeline.resume import ResumableRun
  from gptq_jax.pipeline.stats import PipelineStats

  t_start = time.perf_counter()
  cfg = _config(args)
  _check_args(args)
  timing: dict[str, float] = {}
  _say(f"opening {args.model} (weights stay on the host; one block at a time on the devices) ...")
  rotated_dir = None
  if cfg.rotation != "none":  # rotate the float model once, then stream the rotated copy
    rotated_dir = _rotated_copy(args.model, cfg)
  source = ModelSource(rotated_dir or args.model)
  dtype = args.dtype or source.native_dtype()
  model_config = source.config.replace(dtype=dtype)
  tokenizer = _tokenizer(args, load_tokenizer)
  timing["open model and tokenizer"] = time.perf_counter() - t_start
  t0 = time.perf_counter()
  calib_batches = _calibration(args, cfg, tokenizer)
  timing["calibration tokens"] = time.perf_counter() - t0
  samples = normalize(calib_batches)[0]
  bos = data.bos_token_id(tokenizer)  # Gemma: <bos> starts every calibration and evaluation window
  if bos is not None:
    _say(f"the tokenizer asks for <bos> (id {bos}): every calibration window cut from text and "
         "every evaluation window starts with it")
  state = ResumableRun(args.output, _fingerprint(source, model_config, cfg, samples, dtype),
                       resume=args.resume)
  pid, nproc = jax.process_index(), jax.process_count()
  if nproc > 1:  # each process feeds its share; the Hessians are summed over all (psum)
    share = samples[pid * len(samples) // nproc:(pid + 1) * len(samples) // nproc]
    calib_batches = [{"input_ids": ids[None], "attention_mask": mask[None]} for ids, mask in share]
    _say(f"process {pid}/{nproc}: {len(share)} of {len(samples)} calibration samples, "
         f"{jax.local_device_count()} of {jax.device_count()} devices")
  if args.resume and not state.resuming:
    _say(f"--resume: no interrupted run of {args.output!r} to continue; starting from block 0")

  eval_tokens = None
  if (args.eval_text or "").lower() != "none":
    text = data.sotu_texts("eval") if args.eval_text is None else data.read_text(args.eval_text)
    eval_tokens = data.tokenize_text(text, tokenizer)
  result: dict = {"model": args.model, "config": cfg.to_dict(), "output": args.output,
                  "calibration": args.dataset or CALIB_DEFAULT, "dtype": dtype,
                  "bos_token_id": bos}

  nbytes = source.float_bytes(dtype)
  if args.sample_prompt and nbytes <= SAMPLE_BEFORE_MAX_BYTES and jax.process_index() == 0:
    t0 = time.perf_counter()
    float_params = source.params(dtype)  # the float model's continuation, beside the quantized
    result["sample_before"] = _sample(evaluation, float_params, model_config, tokenizer,
                                      args.sample_prompt)
    del float_params
    timing["sample_before"] = time.perf_counter() - t0
  elif args.sample_prompt:
    _say(f"sample before: skipped (the float model is {nbytes / 2**30:.1f} GiB; only the "
         "quantized model's continuation is printed)")

  done = {i: block for i, block, _ in state.completed()}
  records = [r for _, _, recs in state.completed() for r in recs] if done else []
  if done:
    _say(f"resuming after block {len(done) - 1} ({len(done)}/{model_config.num_hidden_layers} "
         "blocks already quantized)")
  embed_params = source.nonlayer(dtype, only=("embed_tokens",))
  evals = None
  if eval_tokens is not None:
    windows = eval_windows(eval_tokens, cfg.seqlen, args.eval_windows, bos)
    evals = tuple(EvalStream(ModelAdapter.for_config(model_config), embed_params, windows)
                  for _ in range(2))
  host_blocks = dict(done)

  def sink(i, block):
    host_blocks[i] = _host(block)

  adapter = StreamedRun(source, model_config, jnp.dtype(dtype), sink, done=done, evals=evals)
  stats = PipelineStats(sync=args.breakdown)
  t_q = time.perf_counter()
  head_params = source.nonlayer(dtype) if cfg.lm_head else embed_params
  qhead = quantize(head_params, calib_batches, cfg, adapter=adapter, batch_size=args.batch_size,
           stats=stats,
           progress=not args.no_progress and pid == 0, report=records, start_block=len(done),
           on_block_done=state.save_block)
  result["quantize_seconds"] = time.perf_counter() - t_q
  if cfg.lm_head and "lm_head" in qhead:  # --lm-head (a tied embedding is untied)
    from gptq_jax.pipeline.dynamic import untied  # noqa: PLC0415
    model_config = untied(model_config, qhead)
    qhead = {"lm_head": jax.device_get(qhead["lm_head"])}
  else:
    qhead = {}
  del head_params
  result["layers"] = records
  stats.close()
  t0 = time.perf_counter()
  if evals is not None:  # the final norm and the logits: on the device only for this
    nonlayer = source.nonlayer(dtype)
    result["ppl_before"] = evals[0].perplexity(nonlayer, model_config)
    result["ppl_after"] = evals[1].perplexity(nonlayer, model_config)
    del nonlayer
  timing["final norm, logits"] = time.perf_counter() - t0
  adapter_eval_seconds = adapter.eval_seconds
  del embed_params, evals, adapter
  qparams = source.nonlayer_host(dtype)  # host copies, read once from the files
  for i in range(model_config.num_hidden_layers):
    qparams[f"layers_{i}"] = host_blocks.pop(i)
  qparams.update(qhead)
  t0 = time.perf_counter()
  save_checkpoint(args.output, qparams, model_config=model_config, quant_config=cfg,
                  tokenizer=tokenizer, extra={"records": records})
  if pid == 0:
    state.finish()
  _say(f"saved {args.output}")
  if args.save_hf and pid == 0:
    from gptq_jax.interop import export_hf

    from gptq_jax.interop.calibration import describe_default

    export_hf(args.save_hf, qparams, model_config, cfg, tokenizer=tokenizer,
              calibration_source=None if cfg.dataset else describe_default(cfg.nsamples,
                                                                             cfg.seqlen))
    _say(f"exported a Hugging Face GPTQ folder to {args.save_hf}")
  timing["write"] = time.perf_counter() - t0
  if eval_tokens is not None and pid == 0:
    b, a = result["ppl_before"], result["ppl_after"]
    print(f"perplexity on held-out text ({len(windows)} windows of {cfg.seqlen} tokens"
          f"{', each starting with <bos>' if bos is not None else ''}): "
          f"before {b:.3f}, after {a:.3f} ({(a / b - 1) * 100:+.2f}%)", flush=True)
  if args.sample_prompt and pid == 0:
    t0 = time.perf_counter()
    result["sample"] = _sample(evaluation, jax.device_put(qparams), model_config, tokenizer,
                               args.sample_prompt)
    timing["sample_after"] = time.perf_counter() - t0
    print(f"sample generation (greedy, {SAMPLE_TOKENS} tokens at most) of {args.sample_prompt!r}:"
          f"\n  float:     {result.get('sample_before')!r}\n  quantized: {result['sample']!r}",
          flush=True)
  source.close()
  if rotated_dir is not None:
    shutil.rmtree(rotated_dir, ignore_errors=True)
  result["seconds"] = time.perf_counter() - t_start
  result["timing"] = timing
  result["breakdown"] = _breakdown(stats, adapter_eval_seconds, timing, result["seconds"],
                                   model_config.num_hidden_layers, len(done))
  if args.breakdown and pid == 0:
    b = result["breakdown"]
    print("breakdown (s): " + ", ".join(f"{k} {v:.2f}" for k, v in b["seconds"].items())
          + f"; block forwards per block: {b['block_forwards_per_block']:.2f} (minimum for "
          f"true-sequential: {b['minimum_block_forwards_per_block']})", flush=True)
  result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  if args.report and pid == 0:
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    png = report_lib.write(args.report, result)
    _say(f"report: {args.report}" + (f" and {png}" if png else ""))
  return result


def _rotated_copy(model: str, cfg: GPTQConfig) -> str:
  """``--rotation``: the float model with its residual stream rotated (pipeline/rotation.py),
  written once to a temporary HF folder that the streamed run then reads like any other."""
  import tempfile  # noqa: PLC0415

  from gptq_jax.models import load_model, save_hf_folder  # noqa: PLC0415
  from gptq_jax.pipeline.rotation import rotate_model  # noqa: PLC0415

  _say(f"rotating the residual stream ({cfg.rotation}) of {model} ...")
  model_config, params = load_model(model)
  model_config, params = rotate_model(model_config, params, cfg.rotation, seed=cfg.seed)
  folder = tempfile.mkdtemp(prefix="gptq_jax_rotated_")
  save_hf_folder(folder, model_config, params)
  return folder


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    init_distributed(args)
    compile_cache.from_args(args)  # on by default; --no-compile-cache turns it off
    run(args)
  except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
          DatasetUnavailable) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
