"""A run's plan on a slice: every program compiled, HBM per chip, host memory, time at the roofline.

Per chip, a program's peak is the compiler's footprint (``memory_analysis``: arguments + outputs -
donated + temporaries + code) plus what the run keeps alive beside it on the busiest chip (process
0's first device, where the embedding, the block's own copy and the solves live): the calibration
activations of every micro-batch (split over the chips), the inputs kept between passes, the block,
the evaluation windows, the solve's other buffers. The run fits when the largest peak fits the
chip's HBM. Programs are the same for every block of a layer type: each is compiled once and its
calls multiplied (the driver compiles them once too).

Time: each program's calls at the chip's roofline (``Chip.roofline_seconds`` of the compiler's
FLOPs and bytes), per block and in total. A lower bound: loops count their body once (``loops``),
collectives and host transfers are not counted.

Host memory (per host, beyond the process itself): counted, not compiled — the calibration tokens,
the largest tensor read from the checkpoint and its staging copy (the embedding, or one of a
block's), and a finished block fetched for its save (orbax's copy beside it).
"""

from __future__ import annotations

import contextlib
import math

from gptq_jax.core import batched
from gptq_jax.kernels import block_sizes
from gptq_jax.models.families import (layer_expert_specs, layer_tensor_specs,
                                      nonlayer_tensor_specs)
from gptq_jax.pipeline import experts
from gptq_jax.plan import refinement, serving as serving_lib
from gptq_jax.plan.expert_solves import expert_solve
from gptq_jax.plan.layout import Layout, RunSettings
from gptq_jax.plan.measure import Program, nbytes
from gptq_jax.plan.passes import Passes, embedding, kernel_shape
from gptq_jax.plan.slices import Slice
from gptq_jax.plan.solves import solve

GiB = 2**30


def _packed_bytes(lay: Layout, shapes) -> int:
  """Packed bytes of kernels of ``shapes`` (``[in, out]``, or ``[E, in, out]`` stacked experts)."""
  bits, gs = lay.cfg.bits, lay.cfg.group_size
  total = 0
  for shape in shapes:
    e, (k, n) = (shape[0] if len(shape) == 3 else 1), shape[-2:]
    groups = 1 if gs == -1 else -(-k // gs)
    total += e * (k * n * bits // 8 + groups * n * (4 + bits / 8) + k * 4)
  return int(total)


def _chunks(shapes) -> int:
  """Sequential solves of a set: 1, or a mixture of experts' chunks (``core.batched``)."""
  if len(shapes[0]) == 2:
    return 1
  E, k = shapes[0][:2]
  c = batched._chunk_size(k, sum(s[2] for s in shapes), E, batched.DEFAULT_CHUNK_BYTES)
  return -(-E // c)


def _solve_sets(lay: Layout, passes: Passes, group) -> list[list]:
  """The driver's solves of a subset: layers sharing an input solved together (GPTAQ: each
  alone), a mixture of experts' projections apart (batched); the router and a shared-expert gate
  stay float (no solve)."""
  group = [p for p in group if not experts.float_by_default(p)]
  if lay.cfg.gptaq:
    return [[p] for p in group]
  sets: dict = {}
  for p in group:
    sets.setdefault((experts.is_expert_path(p), passes.alias.get(p, p)), []).append(p)
  return sorted(sets.values(), key=lambda ps: not experts.is_expert_path(ps[0]))


def block_programs(lay: Layout, kind, budget: int, common: list) -> dict:
  """Every program of one block of ``kind`` (a ``LayerKind``), each with what lies beside it."""
  passes = Passes(lay, kind, budget)
  block = lay.block(kind, lay.home)
  block_home = nbytes(block)
  stream = lay.nbatches * nbytes(lay.stream_batch()) * (2 if lay.cfg.gptaq else 1)
  batch = nbytes(lay.stream_batch()) * (2 if lay.cfg.gptaq else 1)
  progs: list[Program] = []
  done: list = []  # kernel shapes quantized so far
  steps = 0  # sequential column steps of the solves' column loops
  kept = passes.kept_bytes + [lay.nbatches * nbytes(passes.kept)]
  for g, (group, pas) in enumerate(zip(passes.groups, passes.programs)):
    home = block_home + _packed_bytes(lay, done)
    base = common + [("calibration activations", stream), ("block on its home chip", home)]
    progs.append(pas.with_beside(common + [
        ("calibration activations", stream - batch), ("kept inputs", kept[g] - kept[g] // max(
            1, lay.nbatches)), ("block on its home chip", home)]))
    progs += [c.with_beside(base + [("kept inputs", kept[g + 1]),
                                    ("other running sums", passes.state_bytes[g] - c.hbm_bytes)])
              for c in passes.combines[g]]
    for paths in _solve_sets(lay, passes, group):
      shapes = [kernel_shape(block, p) for p in paths]
      steps += shapes[0][-2] * _chunks(shapes)
      name = "+".join(("experts " if len(shapes[0]) == 3 else "") + p[-1] for p in paths)
      made = (expert_solve(lay, name, shapes) if len(shapes[0]) == 3
              else solve(lay, name, shapes, lay.cfg.gptaq))
      for prog, live in made:
        progs.append(prog.with_beside(base + [("kept inputs", kept[g + 1]),
                                              ("solve buffers", live)]))
      done += shapes
  home = block_home + _packed_bytes(lay, done)
  if lay.cfg.refine_steps:
    refine_progs, gathered = refinement.programs(lay, kind)
    progs += [p.with_beside(common + [("calibration activations", stream),
                                      ("kept inputs", kept[-1]),
                                      ("stream gathered for refinement", gathered),
                                      ("quantized block", _packed_bytes(lay, done))])
              for p in refine_progs]
  prop = passes.propagation()
  prop_kept = 0 if lay.cfg.refine_steps else kept[-1]
  prop = prop.with_beside(common + [("calibration activations", stream - batch),
                                    ("kept inputs", prop_kept - prop_kept // max(1, lay.nbatches)),
                                    ("block on its home chip", home)])
  return {"programs": progs, "propagation": prop, "column_steps": steps}


def kind_label(model, kind) -> str:
  """A layer kind by name: its attention type (", experts" / ", dense MLP" in a mixture of
  experts)."""
  if not model.num_experts:
    return kind.attention
  return f"{kind.attention}, {'experts' if kind.sparse else 'dense MLP'}"


def not_plannable(model) -> str | None:
  """Why the planner cannot plan this model faithfully (None: it can)."""
  if model.hidden_size_per_layer_input or any(k.kv_shared for k in model.layer_kinds) or (
      model.model_type.startswith("gemma4")):
    return (f"scripts/plan.py does not plan {model.model_type} (Gemma 4): its blocks read "
            "per-layer inputs and shared keys / values that the context carries from block to "
            "block, which the planned programs do not; quantize it without a plan")
  return None


def check_plannable(run: RunSettings) -> None:
  """Refuses, in one line and before any work, what the planner cannot plan faithfully, and what
  mixture-of-experts quantization itself refuses."""
  why = not_plannable(run.model)
  if why:
    raise ValueError(why)
  experts.check_model(run.cfg, run.model, None)


def plan_quantization(run: RunSettings, sl: Slice, *, with_serving: bool = True) -> dict:
  check_plannable(run)
  lay = Layout(run, sl)
  model, chip = run.model, sl.chip
  tpu = sl.devices[0].platform == "tpu"
  ctx = block_sizes.for_generation(chip.generation) if tpu else contextlib.nullcontext()
  with ctx:
    embed_home = model.vocab_size * model.hidden_size * lay.dtype.itemsize
    hidden, ctx_b, mask = lay.stream_batch(1, lay.seqlen, lay.home)
    evals = 2 * run.eval_windows * nbytes([hidden, ctx_b])
    common = [("embedding (home chip)", embed_home), ("evaluation windows", evals)]
    stream = lay.nbatches * nbytes(lay.stream_batch()) * (2 if lay.cfg.gptaq else 1)
    budget = (run.stash_bytes if run.stash_bytes is not None
              else int(0.5 * (chip.hbm_bytes - embed_home - evals - stream)))
    emb = embedding(lay).with_beside([("calibration activations", stream)] + common[1:])
    per_type = {}
    for kind in dict.fromkeys(model.layer_kinds):  # one compiled set per kind, in layer order
      per_type[kind] = block_programs(lay, kind, budget, common)
    serve = (serving_lib.serving(model, run.cfg, chip, sl.local[0], run.seqlen)
             if with_serving and tpu and not model.num_experts else None)
  plan = _summarize(lay, emb, per_type, serve)
  if with_serving and model.num_experts:
    plan["serving_refusal"] = SERVING_MOE
  return plan


SERVING_MOE = ("serving: not planned for a mixture of experts (its decode runs the experts' "
               "grouped matmul as a loop over expert tiles whose body the compiler's cost counts "
               "once, so its roofline would be a gross undercount); the quantization is planned")


def _summarize(lay: Layout, emb: Program, per_type: dict, serve) -> dict:
  run, sl, chip, model = lay.run, lay.slice, lay.slice.chip, lay.model
  everything = [emb] + [p for t in per_type.values() for p in t["programs"] + [t["propagation"]]]
  worst = max(everything, key=lambda p: p.peak_bytes)
  per_block = {kind: sum(p.seconds(chip) for p in t["programs"]) + t["propagation"].seconds(chip)
               for kind, t in per_type.items()}
  counts = {kind: model.layer_kinds.count(kind) for kind in per_type}
  last = model.layer_kinds[-1]
  total = emb.seconds(chip) + sum(counts[k] * s for k, s in per_block.items()) - (
      per_type[last]["propagation"].seconds(chip) if not lay.cfg.lm_head else 0.0)
  host = host_bytes(lay)
  fits = worst.peak_bytes <= chip.hbm_bytes
  out = {
      "topology": sl.name, "generation": chip.generation, "chips": sl.chips,
      "num_hosts": sl.num_hosts, "model_type": model.model_type,
      "num_hidden_layers": model.num_hidden_layers,
      "settings": {"nsamples": run.nsamples, "seqlen": run.seqlen, "batch_size": run.batch_size,
                   "micro_batch": lay.batch, "micro_batches": lay.nbatches,
                   "dtype": model.dtype, "bits": lay.cfg.bits, "group_size": lay.cfg.group_size,
                   "desc_act": lay.cfg.desc_act, "gptaq": lay.cfg.gptaq,
                   "refine_steps": lay.cfg.refine_steps, "eval_windows": run.eval_windows},
      "fits": fits, "hbm_peak_bytes_per_chip": worst.peak_bytes,
      "hbm_bytes_per_chip": chip.hbm_bytes, "peak_program": worst.name,
      "peak_parts": dict(worst.beside_parts + (("the program itself", worst.hbm_bytes),)),
      "host_peak_bytes": host["peak"], "host_parts": host["parts"],
      "est_seconds": total,
      "est_seconds_per_block": {kind_label(model, k): v for k, v in per_block.items()},
      "blocks_per_type": {kind_label(model, k): v for k, v in counts.items()},
      # the solves' column loops step through a layer's input columns one at a time: latency the
      # roofline does not see
      "column_steps_per_block": {kind_label(model, k): t["column_steps"]
                                 for k, t in per_type.items()},
      "programs": [p.to_dict() for p in everything],
      "programs_with_loops": sorted({p.name for p in everything if p.loops}),
      "serving": serve,
  }
  out["refusal"] = None if fits else refusal(lay, worst)
  return out


def host_bytes(lay: Layout) -> dict:
  run, model = lay.run, lay.model
  item = lay.dtype.itemsize
  tokens = 2 * run.nsamples * run.seqlen * 4 * 2  # the samples and their micro-batch copies
  i = max(range(model.num_hidden_layers), key=lambda j: model.sparse_layer(j))  # experts first
  experts_of = [(len(e.names),) + tuple(e.shape[::-1]) for e in layer_expert_specs(model, i)]
  layer = [math.prod(s) for _, _, s in layer_tensor_specs(model, i)] + [
      math.prod(s) for s in experts_of]  # an expert projection is read stacked
  nonlayer = [math.prod(s) for _, _, s in nonlayer_tensor_specs(model)]
  block_params = sum(layer)
  kernels = [tuple(s[::-1]) for p, _, s in layer_tensor_specs(model, i)
             if p[-1] == "kernel"] + experts_of
  packed = _packed_bytes(lay, kernels) + (block_params - sum(math.prod(s) for s in kernels)) * 4
  parts = {"calibration tokens": tokens,
           "largest tensor read and staged": 2 * max(layer + nonlayer) * item,
           "a finished block fetched for its save (and orbax's copy)": 2 * packed}
  peak = tokens + max(parts["largest tensor read and staged"],
                      2 * max(layer) * item + parts[
                          "a finished block fetched for its save (and orbax's copy)"])
  return {"peak": int(peak), "parts": {k: int(v) for k, v in parts.items()}}


def refusal(lay: Layout, worst: Program) -> str:
  """One line: what does not fit, and the setting to change (by what takes most at the peak)."""
  chip, parts = lay.slice.chip, dict(worst.beside_parts)
  parts["the program itself"] = worst.hbm_bytes
  data = parts.get("calibration activations", 0) + parts.get("kept inputs", 0)
  what = max(parts, key=parts.get)
  head = (f"the run needs {fmt_bytes(worst.peak_bytes)} per chip at '{worst.name}' and a "
          f"{chip.generation} chip has {fmt_bytes(chip.hbm_bytes)}; most of it is {what} "
          f"({fmt_bytes(parts[what])}): ")
  if worst.phase == "refinement" or what == "stream gathered for refinement":
    advice = ("use --refine-steps 0 (refinement gathers the calibration set and float32 copies "
              "of the block on one chip), or fewer --nsamples / a shorter --seqlen")
  elif what == "evaluation windows":
    advice = "use fewer --eval-windows, or --eval-text none"
  elif what in ("calibration activations", "kept inputs") or data >= parts[what]:
    advice = (f"use more chips (the calibration activations, {fmt_bytes(data)} per chip, are "
              "split over them), or fewer --nsamples / a shorter --seqlen"
              + (", or --stash-mb 0" if parts.get("kept inputs", 0) else ""))
  elif what == "the program itself" and worst.phase in ("hessian passes", "propagation",
                                                          "embedding"):
    advice = (f"use --batch-size {lay.slice.chips} (micro-batches of {lay.batch} samples), or a "
              "shorter --seqlen" if lay.batch > lay.slice.chips else
              "use a shorter --seqlen, or more chips (smaller micro-batches per chip)")
  else:
    advice = ("use a chip with more HBM: the embedding, a block and a layer's solve stay on one "
              "chip whatever the number of chips")
  return head + advice


def fmt_bytes(n: float) -> str:
  for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


__all__ = ["RunSettings", "check_plannable", "fmt_bytes", "host_bytes", "not_plannable",
           "plan_quantization", "refusal"]
