"""``scripts/quantize_llama.py``: quantize a decoder checkpoint (any supported family) with GPTQ,
resumably, with a report.

Flags are named after the GPTQConfig fields. The run streams (``cli/stream.py``, docs/scale.md):
open the model lazily (weights stay memory-mapped on the host), build the calibration batches,
quantize block by block with one block at a time on the devices — each finished block saved under
``<output>.partial`` so ``--resume`` continues a killed run, and the held-out windows carried
through the float and the quantized block in the same pass for the perplexity before / after —
then write the orbax checkpoint from those saved blocks, a part at a time (``cli/output.py``;
and a Hugging Face GPTQ folder with ``--save-hf``), print a sample
generation, and write the ``--report`` JSON (and a PNG plot of the loss per layer beside it).
Under ``jax.distributed`` every process feeds its share of the calibration samples and process 0
writes the files.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from gptq_jax.cli import compile_cache, peers, preflight, serving
from gptq_jax.cli.args import _check_args, _config, _parser  # noqa: F401 (tests import them here)
from gptq_jax.config import GPTQConfig
from gptq_jax.data import DatasetUnavailable


CALIB_DEFAULT = "bundled State of the Union addresses 1990-2015 (gptq_jax/assets/sotu)"


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
    peers.lost_after_seconds()  # a bad $GPTQ_JAX_LOST_AFTER_SECONDS fails before the processes meet
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=300)
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice
    jax.distributed.initialize()
  else:
    return
  peers.watch(jax.process_index(), jax.process_count(), args.output)  # a lost process: an error


SAMPLE_BEFORE_MAX_BYTES = 2 << 30  # the float sample needs the whole float model: small ones only


def _calibration(args, cfg, tokenizer):
  from gptq_jax import data

  sizes = dict(nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed,
               batch_size=args.batch_size or 1)
  if cfg.dataset is None:  # offline default: the bundled addresses 1990-2015
    return data.text_calib_batches(data.sotu_texts("calib"), tokenizer, **sizes)
  return data.get_calib_batches(cfg.dataset, tokenizer, **sizes)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt")


def _has_tokenizer_files(model: str) -> None:
  """Raise for a folder with no tokenizer file, before transformers is imported (its tokenizer
  machinery imports torch: about 190 MiB resident that a folder without a tokenizer never uses)."""
  if os.path.isdir(model) and not any(os.path.isfile(os.path.join(model, f))
                                      for f in TOKENIZER_FILES):
    raise ValueError(f"{model!r} has no tokenizer file (none of {', '.join(TOKENIZER_FILES)})")


def _tokenizer(args, load_tokenizer):
  """The model's tokenizer; a folder without one still runs when nothing needs it (token ids from
  a .npy, no evaluation text, no sample): the outputs then carry no tokenizer files."""
  try:
    _has_tokenizer_files(args.model)
    return load_tokenizer(args.model)
  except ValueError as e:
    needless = ((args.dataset or "").endswith(".npy") and not args.sample_prompt
                and args.eval_text.lower() == "none")
    if not needless:
      raise
    _say(f"no tokenizer ({e}); not needed with token ids from {args.dataset}: going on without")
    return None


def _fingerprint(source, model_config, cfg, samples, dtype: str) -> dict:
  from gptq_jax.resume import calibration_digest

  qc = cfg.to_dict()
  qc.pop("backend", None)  # how the result is run later does not change it
  fp = {"model": {"config": model_config.to_hf_dict(), "weights": source.digest(),
                  "dtype": dtype},
        "quant_config": qc, "calibration": calibration_digest(samples)}
  return {**fp, **_refinement_devices(cfg)}


def _refinement_devices(cfg) -> dict:
  """Refinement draws its minibatches per device (pipeline/refine_rows.py): a run resumed on
  another number of devices would train other minibatches than the interrupted one, so the
  device count is part of the resume fingerprint then (everything else gives the same model on
  any device and process count: core/hessian.py)."""
  import jax  # noqa: PLC0415

  return {"device count (refinement)": jax.device_count()} if cfg.refine_steps else {}


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
  return {"seconds": seconds, "counts": s["counts"], "passes_per_block": passes / n,
          # the matmul work of the passes and the propagation, in block forwards (stash.py);
          # running every matmul of a block once is 1
          "block_forwards_per_block": s["forward_work_per_block"] or 0.0,
          "minimum_block_forwards_per_block": 1.0, "stash": s["stash"]}


def _stash_text(stash: dict) -> str:
  if not stash:
    return "none"
  return (f"subsets {stash['kept_subsets']} ({stash['kept_bytes_per_device'] / 2**20:.0f} MiB per "
          f"device of a {stash['budget_bytes_per_device'] / 2**20:.0f} MiB budget), recomputed "
          f"{[g for g in stash['recomputed_subsets'] if g]}")


def run(args) -> dict:
  """The whole job (``_run``); what it froze for its per-block collections is thawed at its end,
  however it ends (a caller's process collects those objects again)."""
  from gptq_jax.cli import stream

  try:
    return _run(args)
  finally:
    stream.thaw_heap()


def _run(args) -> dict:
  import jax
  import jax.numpy as jnp

  from gptq_jax import data
  from gptq_jax.cli import output, report as report_lib
  from gptq_jax.cli import stream
  from gptq_jax.cli.source import ModelSource
  from gptq_jax.models import load_tokenizer
  from gptq_jax.models.families import embedding_keys
  from gptq_jax.pipeline import quantize
  from gptq_jax.pipeline.adapter import ModelAdapter
  from gptq_jax.pipeline.calib import normalize
  from gptq_jax.resume import ResumableRun
  from gptq_jax.pipeline.stats import PipelineStats

  t_start = time.perf_counter()
  cfg = _config(args)
  _check_args(args)
  timing: dict[str, float] = {}
  _say(f"opening {args.model} (weights stay on the host; one block at a time on the devices) ...")
  # --rotation: each block, embedding row and head slice is rotated as it is read (cli/source.py)
  source = ModelSource(args.model, cfg.rotation, cfg.seed)
  dtype = args.dtype or source.native_dtype()
  model_config = source.config.replace(dtype=dtype)
  cfg = serving.apply(args, cfg, model_config, _say)  # --target / --hf-format, before any work
  preflight.check_fits(args, cfg, model_config, dtype, _say)  # on TPU: refuses what will not fit
  tokenizer = _tokenizer(args, load_tokenizer)
  stream.freeze_heap()  # the modules and the tokenizer: not scanned by each block's collection
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
  if args.eval_text.lower() != "none":
    text = data.read_text(args.eval_text)
    eval_tokens = data.tokenize_text(text, tokenizer)
  result: dict = {"model": args.model, "config": cfg.to_dict(), "output": args.output,
                  "calibration": args.dataset or CALIB_DEFAULT, "dtype": dtype,
                  "bos_token_id": bos}

  nbytes = source.float_bytes(dtype)
  if args.sample_prompt and nbytes <= SAMPLE_BEFORE_MAX_BYTES and jax.process_index() == 0:
    t0 = time.perf_counter()
    _say(f"[sample] the float model's continuation ({output.SAMPLE_TOKENS} tokens at most) ...")
    float_params = source.params(dtype)  # the float model's continuation, beside the quantized
    result["sample_before"] = output.sample(float_params, model_config, tokenizer,
                                            args.sample_prompt)
    del float_params
    stream.trim_heap()  # the float model's pages back to the system before the blocks
    timing["sample_before"] = time.perf_counter() - t0
  elif args.sample_prompt:
    _say(f"sample before: skipped (the float model is {nbytes / 2**30:.1f} GiB; only the "
         "quantized model's continuation is printed)")

  done = state.saved()  # each block read back from the resume state only when it is used
  records = list(done.records)
  if done:
    _say(f"resuming after block {len(done) - 1} ({len(done)}/{model_config.num_hidden_layers} "
         "blocks already quantized)")
  windows = None if eval_tokens is None else stream.eval_windows(eval_tokens, cfg.seqlen,
                                                                 args.eval_windows, bos)
  if model_config.hidden_size_per_layer_input:  # Gemma 4's per-layer input tables: whole
    embed_params = source.tables(dtype, embedding_keys(model_config))
  else:  # only the embedding's rows of the tokens the windows use, read from the files
    used = stream.used_tokens(*[ids for ids, _ in samples],
                              *([] if windows is None else [windows]))
    embed_params = stream.embedding_table(source.embedding_rows(used), used, dtype)
  evals = None
  if windows is not None:
    evals = tuple(stream.EvalStream(ModelAdapter.for_config(model_config), embed_params, windows)
                  for _ in range(2))
  # Nothing of a finished block stays in memory: on_block_done saves it (the resume state), and
  # the outputs are assembled from those saves (cli/output.py).
  adapter = stream.StreamedRun(source, model_config, jnp.dtype(dtype), lambda i, block: None,
                               done=done, evals=evals)
  stats = PipelineStats(sync=args.breakdown)
  t_q = time.perf_counter()
  head_params = dict(embed_params)
  if cfg.lm_head:  # the final norm (the head is read a slice at a time: StreamedRun)
    head_params["norm"] = jax.tree.map(lambda x: jnp.asarray(x, dtype), source.final_norm())
  stash_mb = getattr(args, "stash_mb", None)
  qhead = quantize(head_params, calib_batches, cfg, adapter=adapter, batch_size=args.batch_size,
           stats=stats, stash_bytes=None if stash_mb is None else int(stash_mb * 2**20),
           spread_solves=getattr(args, "spread_solves", "auto"),
           progress=not args.no_progress and pid == 0, report=records, start_block=len(done),
           on_block_done=state.save_block)
  result["quantize_seconds"] = time.perf_counter() - t_q
  if cfg.lm_head and "lm_head" in qhead:  # --lm-head (a tied embedding is untied)
    from gptq_jax.models.params import untied  # noqa: PLC0415
    model_config = untied(model_config, qhead)
    qhead = {"lm_head": jax.device_get(qhead["lm_head"])}
  else:
    qhead = {}
  del head_params
  result["layers"] = records
  stats.close()
  t0 = time.perf_counter()
  if evals is not None:  # the final norm and the logits, a slice of the vocabulary at a time
    result["ppl_before"], result["ppl_after"] = _perplexities(source, evals, qhead, model_config,
                                                              dtype, pid == 0)
  timing["final norm, logits"] = time.perf_counter() - t0
  adapter_eval_seconds = adapter.eval_seconds
  del embed_params, evals, adapter
  stream.trim_heap()
  t0 = time.perf_counter()
  calibration_source = _calibration_source(cfg)
  output.save_checkpoint(args.output, source=source, dtype=dtype, blocks_dir=state.blocks_dir,
                         qhead=qhead, model_config=model_config, quant_config=cfg,
                         tokenizer=tokenizer, records=records, progress=pid == 0,
                         extra={"calibration_source": calibration_source})
  if pid == 0:
    state.finish()
  _say(f"saved {args.output}")
  if args.save_hf:  # every process reads (orbax's barriers), process 0 writes
    output.export_hf(args.save_hf, args.output, model_config=model_config, quant_config=cfg,
                     tokenizer=tokenizer, calibration_source=calibration_source,
                     write=pid == 0, hf_format=args.hf_format or "gptq", progress=pid == 0)
    _say(f"exported a Hugging Face {args.hf_format or 'gptq'} folder to {args.save_hf}")
    if pid == 0:
      from gptq_jax.cli import export as export_cli  # noqa: PLC0415

      export_cli.report(args.save_hf, write=True)
  timing["write"] = time.perf_counter() - t0
  if eval_tokens is not None and pid == 0:
    b, a = result["ppl_before"], result["ppl_after"]
    print(f"perplexity on held-out text ({len(windows)} windows of {cfg.seqlen} tokens"
          f"{', each starting with <bos>' if bos is not None else ''}): "
          f"before {b:.3f}, after {a:.3f} ({(a / b - 1) * 100:+.2f}%)", flush=True)
  if args.sample_prompt:
    _say(f"[sample] the quantized model's continuation ({output.SAMPLE_TOKENS} tokens at most) ...")
  stream.trim_heap()  # what the checkpoint's assembly freed, before the quantized model is read
  qparams = output.load_for_sample(args.output) if args.sample_prompt else None  # collective
  if args.sample_prompt and pid == 0:
    t0 = time.perf_counter()
    result["sample"] = output.sample(qparams, model_config, tokenizer, args.sample_prompt)
    del qparams
    timing["sample_after"] = time.perf_counter() - t0
    print(f"sample generation (greedy, {output.SAMPLE_TOKENS} tokens at most) of "
          f"{args.sample_prompt!r}:"
          f"\n  float:     {result.get('sample_before')!r}\n  quantized: {result['sample']!r}",
          flush=True)
  source.close()
  result["seconds"] = time.perf_counter() - t_start
  result["timing"] = timing
  result["breakdown"] = _breakdown(stats, adapter_eval_seconds, timing, result["seconds"],
                                   model_config.num_hidden_layers, len(done))
  if args.breakdown and pid == 0:
    b = result["breakdown"]
    print("breakdown (s): " + ", ".join(f"{k} {v:.2f}" for k, v in b["seconds"].items())
          + f"; block forwards per block (matmul work): {b['block_forwards_per_block']:.2f} "
          f"(minimum {b['minimum_block_forwards_per_block']:.0f}) in {b['passes_per_block']:.2f} "
          f"passes; kept inputs: {_stash_text(b['stash'])}", flush=True)
  result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  if args.report and pid == 0:
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    png = report_lib.write(args.report, result)
    _say(f"report: {args.report}" + (f" and {png}" if png else ""))
  return result


def _calibration_source(cfg: GPTQConfig) -> dict:
  """What the calibration data was (recorded in the checkpoint and the Hugging Face export)."""
  from gptq_jax.interop import calibration  # noqa: PLC0415

  if cfg.dataset is None:
    return calibration.describe_default(cfg.nsamples, cfg.seqlen)
  return calibration.describe(cfg.dataset, cfg.nsamples, cfg.seqlen)


def _perplexities(source, evals, qhead: dict, model_config, dtype: str, show: bool):
  """Before / after perplexity from the two streams' last hidden states: the final norm and the
  output projection a slice of the vocabulary at a time (cli/stream.py, ``streamed_nll``); the
  after stream reads the quantized head with ``--lm-head``."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from gptq_jax.cli.phases import Phase  # noqa: PLC0415
  from gptq_jax.cli.stream import streamed_nll  # noqa: PLC0415
  from gptq_jax.core.weights import packed_columns  # noqa: PLC0415

  chunks = source.vocab_chunks()
  float_head = lambda lo, hi: source.head_slice(lo, hi, dtype)  # noqa: E731
  after = float_head
  if "lm_head" in qhead and hasattr(qhead["lm_head"]["kernel"], "qweight"):
    packed = qhead["lm_head"]["kernel"]
    after = lambda lo, hi: jax.device_put(packed_columns(packed, lo, hi))  # noqa: E731
  norm = jax.tree.map(lambda x: jnp.asarray(x, dtype), source.final_norm())
  phase = Phase("evaluation", len(chunks), "slices of the vocabulary (final norm, logits)", show)
  return streamed_nll(list(evals), [float_head, after], norm, model_config, chunks,
                      progress=lambda k: phase.update(k + 1))


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    _config(args)
    _check_args(args)  # bad input fails here at once, before the processes meet
    init_distributed(args)
    compile_cache.from_args(args)  # on by default; --no-compile-cache turns it off
    run(args)
  except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
          DatasetUnavailable) as e:
    peers.first_a_lost_peer()
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception:
    peers.first_a_lost_peer()
    raise
  return 0
