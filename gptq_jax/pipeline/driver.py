"""``quantize(params, calib_batches, cfg)``: GPTQ for a whole decoder, block by block.

As the references' driver (docs/algorithm.md): embed the calibration tokens (the first block's
input); for each block, accumulate the Hessians of its linears over all calibration samples and
quantize them — with ``true_sequential``, subset by subset (``[q, k, v]``, ``[o]``, ``[gate, up]``,
``[down]``), each subset's Hessians taken with the earlier subsets already quantized — then run the
block with its quantized weights to make the next block's input. Only one block's activations (its
inputs and outputs) are alive at a time. With several devices, micro-batches are split over a data
axis and the Hessian sums are combined with ``psum`` (``capture.py``).
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from gptq_jax.config import GPTQConfig
from gptq_jax.core.gptq import quantize_weight  # noqa: F401 (re-exported for callers)
from gptq_jax.core.shared import can_share, quantize_shared as solve_shared, solve_mesh
from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.pipeline import calib, dynamic, experts, multihost
from gptq_jax.pipeline.adapter import (DecoderAdapter, ModelAdapter, block_adapter, get_path,
                                       set_path)
from gptq_jax.pipeline.capture import (HessianCapture, capture_for, ctx_advancer_for,
                                       embed_runner, runner_for)
from gptq_jax.pipeline.gptaq import cross_capture_for
from gptq_jax.pipeline.progress import BlockProgress
from gptq_jax.pipeline.refine import refine_stream
from gptq_jax.pipeline.rotation import check_rotated
from gptq_jax.pipeline.stash import StashPlan, forward_work, given_for
from gptq_jax.pipeline.stats import PipelineStats

BlockDone = Callable[[int, Any, list[dict]], None]


def _is_quantized(x: Any) -> bool:
  return isinstance(x, (PackedWeight, QuantizedWeight))


def dense_block(block_params: Any) -> Any:
  """The block with every quantized kernel dequantized (float32): what propagation runs."""
  return jax.tree.map(lambda x: x.dequantize() if _is_quantized(x) else x, block_params,
                      is_leaf=_is_quantized)


def _float_dtype(block: Any) -> Any:
  """The dtype of the block's float kernels (what its quantized kernels dequantize to)."""
  leaves = jax.tree.leaves(block, is_leaf=_is_quantized)
  return next((x.dtype for x in leaves if not _is_quantized(x) and getattr(x, "ndim", 0) == 2),
              jax.numpy.float32)


def _working_copy(block: Any, dtype: Any) -> Any:
  """The block with its quantized kernels dequantized in ``dtype``: what the later passes and the
  propagation run (``_quantize_group`` makes the same values one layer at a time)."""
  return jax.tree.map(lambda x: x.dequantize(dtype) if _is_quantized(x) else x, block,
                      is_leaf=_is_quantized)


def resolve_adapter(params: Any, model_config: Any = None,
                    adapter: DecoderAdapter | None = None) -> DecoderAdapter:
  if adapter is not None:
    return adapter
  model_config = model_config or getattr(params, "config", None)
  if model_config is None:
    raise ValueError("quantize() cannot tell which model these params belong to (a bare dict "
                     "carries no architecture): load them with gptq_jax.models.load_model (its "
                     "params carry their config), pass model_config=<gptq_jax.models.ModelConfig>, "
                     "or pass adapter=<DecoderAdapter> for another decoder")
  return ModelAdapter.for_config(model_config)


def resolve_mesh(mesh: Mesh | str | None, axis_name: str) -> Mesh | None:
  if mesh == "auto":
    n = jax.device_count()
    return jax.make_mesh((n,), (axis_name,)) if n > 1 else None
  if mesh is not None and not isinstance(mesh, Mesh):
    raise ValueError(f"mesh={mesh!r} must be 'auto', None or a jax.sharding.Mesh")
  if mesh is not None and axis_name not in mesh.shape:
    raise ValueError(f"the mesh has axes {tuple(mesh.shape)}; no data axis {axis_name!r}")
  return mesh


class _Stream:
  """The calibration micro-batches and their current hidden states (one block's activations)."""

  def __init__(self, adapter, params, batches, mesh, axis_name):
    self.mesh, self.axis = mesh, axis_name
    put = functools.partial(multihost.put_batch, mesh, axis_name)  # this process's rows
    embed = embed_runner(adapter, mesh, axis_name)
    self.masks, self.hidden, self.ctx = [], [], []
    real = sum(int(b.attention_mask.any(axis=1).sum()) for b in batches)
    # each row's calibration sample index (-1: padding), laid out like the rows (refine.py)
    self.ids = [put(i) for i in calib.sample_ids(batches, multihost.sample_offset(real))]
    for b in batches:
      ids, mask = put(b.input_ids), put(b.attention_mask)
      h, ctx = embed(params, ids, mask)
      self.masks.append(mask)
      self.hidden.append(h)
      self.ctx.append(ctx)

  def replicate(self, block_params):
    """The block's parameters on every device of the mesh, once (not once per micro-batch)."""
    return block_params if self.mesh is None else multihost.replicate(self.mesh, block_params)

  def propagate(self, run, block_params, given=None) -> list:
    """The block's outputs; ``given[k]``: micro-batch k's kept linear inputs (stash.py).
    -> the block's inputs (for ``advance``)."""
    inputs = self.hidden
    block_params = self.replicate(block_params)
    given = given or [None] * len(self.hidden)
    self.hidden = [run(block_params, h, c, g) for h, c, g in zip(self.hidden, self.ctx, given)]
    return inputs

  def advance(self, advance, block_params, inputs) -> None:
    """The next block's context (``advance``: ``capture.ctx_advancer_for``; None: unchanged)."""
    if advance is not None:
      self.ctx = [advance(block_params, h, c) for h, c in zip(inputs, self.ctx)]


LayerConfig = Callable[[str], "GPTQConfig | None"]


def _solve_sets(capture: HessianCapture, group, names, configs) -> list[list[int]]:
  """Indices of ``group`` solved together: the layers that read the same input (one Hessian)
  under the same settings. A layer whose config is None is skipped (stays float)."""
  sets: dict[tuple, list[int]] = {}
  for k, path in enumerate(group):
    if configs[k] is None:
      continue
    key = (capture.alias.get(path, path), configs[k])
    sets.setdefault(key if can_share(configs[k]) else (path, configs[k]), []).append(k)
  return list(sets.values())


def _refuse_quantized(kernel: Any, name: str) -> None:
  if _is_quantized(kernel):
    raise ValueError(f"{name} is already quantized: quantize a float model (an HF float folder, "
                     "a .gguf file or an embedded name), not a GPTQ folder or checkpoint")


def _quantize_group(capture: HessianCapture, block: Any, work: Any, group, cfg: GPTQConfig,
                    i: int, progress: BlockProgress, records: list[dict],
                    layer_config: LayerConfig | None = None, spread: Mesh | None = None,
                    total_tokens: float = 0.0):
  """Quantize the linears ``group`` of block ``i`` from the Hessians in ``capture``.

  Layers sharing a Hessian and a config are solved in one call (``core.shared``: H factorized
  once, the codes those of separate solves; their rows spread over ``spread``'s devices when
  given). ``layer_config(name)`` gives a layer's own settings
  (None: leave it unquantized); default: ``cfg`` for every layer. A mixture-of-experts layer's
  experts are solved together (pipeline/experts.py; ``total_tokens``: the calibration tokens,
  for the few-token fallback); its router stays float unless a dynamic rule names it.
  """
  routed = [p for p in group if capture.alias.get(p, p) in capture.routed]
  if routed:  # a mixture-of-experts layer's experts: their own Hessians, solved together
    n_exp = get_path(block, routed[0])["kernel"].shape[0]
    configs = [experts.expert_config(cfg, i, p, n_exp, layer_config) for p in routed]
    for p in routed:
      _refuse_quantized(get_path(block, p)["kernel"], f"layers.{i}." + ".".join(p))
    block, work = experts.quantize_expert_sets(capture, block, work, routed, configs, i, progress,
                                               records, total_tokens, spread)
    group = tuple(p for p in group if p not in routed)
  names = [f"layers.{i}." + ".".join(path) for path in group]
  if layer_config is None:  # per-module precision (GPTQModel's dynamic), or None: stays float
    configs = [dynamic.resolve(cfg, dynamic.module_name(i, path)) for path in group]
  else:
    configs = [layer_config(n) for n in names]
  configs = [dynamic.resolve(cfg, dynamic.module_name(i, p), unmatched=None)  # the router
             if experts.float_by_default(p) else c for p, c in zip(group, configs)]
  for k, path in enumerate(group):
    kernel = get_path(block, path)["kernel"]
    _refuse_quantized(kernel, names[k])
    if configs[k] is None:  # a "-:" rule
      records.append({"block": i, "layer": names[k], "shape": list(kernel.shape), "skipped": True})
  sets = _solve_sets(capture, group, names, configs)
  rep = lambda k: capture.alias.get(group[k], group[k])  # noqa: E731 (whose H layer k reads)
  for n_set, ks in enumerate(sets):
    t0 = time.perf_counter()
    kernels = [get_path(block, group[k])["kernel"] for k in ks]
    c0 = configs[ks[0]]
    if c0.gptaq:  # GPTAQ's solve also needs the layer's cross-term dXXT (pipeline/gptaq.py)
      path0 = group[ks[0]]
      results = [quantize_weight(kernels[0], capture.hessian(path0), c0, return_info=True,
                                 name=names[ks[0]], cross=capture.cross(path0))]
    else:
      results = solve_shared(kernels, capture.hessian(group[ks[0]]), c0, [names[k] for k in ks],
                             **({} if spread is None else {"mesh": spread}))
      if hasattr(capture, "release") and all(rep(k) != rep(ks[0]) for later in sets[n_set + 1:]
                                             for k in later):
        capture.release(group[ks[0]])  # no later solve reads this H: free it now
    seconds = (time.perf_counter() - t0) / len(ks)
    for k, kernel, (qw, info) in zip(ks, kernels, results):
      path, c = group[k], configs[k]
      packed = qw.pack(c.format)
      block = set_path(block, path + ("kernel",), packed)
      if work is not None:
        work = set_path(work, path + ("kernel",), packed.dequantize(kernel.dtype))
      records.append({"block": i, "layer": names[k], "shape": list(kernel.shape),
                      "loss": info.loss, "damp": info.damp, "fallback": info.fallback,
                      "seconds": seconds, "solved_with": len(ks)})
      progress.update(i, ".".join(path), info.loss)
    kernels = results = kernel = qw = packed = None  # nothing of this set outlives its solve
  return block, work


def quantize(params: Any, calib_batches: Any, cfg: GPTQConfig, *, model_config: Any = None,
             adapter: DecoderAdapter | None = None, mesh: Mesh | str | None = "auto",
             axis_name: str = "data", batch_size: int | None = None, progress: bool = True,
             report: list[dict] | None = None, start_block: int = 0,
             on_block_done: BlockDone | None = None,
             layer_config: LayerConfig | None = None,
             stats: PipelineStats | None = None, stash_bytes: int | None = None,
             spread_solves: str | Mesh | None = "auto") -> Any:
  """GPTQ-quantize every decoder block's linears; returns params with packed kernels.

  Args:
    params: the model's parameter pytree (the built-in decoder's, from ``load_model``).
    calib_batches: token ids ``[nsamples, seqlen]``, or a list of arrays / ``{"input_ids",
      "attention_mask"}`` dicts (``gptq_jax.data.get_calib_batches``).
    cfg: the GPTQ settings.
    model_config: the ``ModelConfig`` when ``params`` do not carry it.
    adapter: a ``DecoderAdapter`` for another decoder architecture.
    mesh: "auto" (every device on one data axis when there are several), None (one device) or a
      ``Mesh`` with a ``axis_name`` axis: micro-batches are split over it.
    batch_size: samples per micro-batch (default: the largest given batch, at least one sample per
      device), rounded up to a multiple of the data axis size.
    progress: print a progress line per block (stderr).
    report: a list to which one record per quantized layer is appended (loss, damping, time).
    start_block: resume: blocks before it are already quantized in ``params``; the calibration
      data is propagated through them and quantization continues from there.
    on_block_done: called as ``on_block_done(i, quantized_block_params, records)`` after each block.
    layer_config: ``layer_config("layers.3.mlp.up_proj") -> GPTQConfig | None``: a layer's own
      settings (None leaves it float); default ``cfg`` for all. Layers sharing a Hessian and a
      config are solved together.
    stats: a ``PipelineStats`` that collects where the time goes (``pipeline/stats.py``).
    stash_bytes: bytes per device for the subsets' inputs kept between passes (``pipeline/
      stash.py``; None: half the free memory, 0: recompute every pass from the block's input).
    spread_solves: split each solve's rows over this process's devices (``core.shared.solve_mesh``:
      "auto" on several TPUs / GPUs, "on", "off"; the codes are the same).

  Returns:
    ``params`` with each quantized linear's ``"kernel"`` a ``PackedWeight`` in ``cfg.format``.
  """
  if not isinstance(cfg, GPTQConfig):
    raise ValueError(f"cfg must be a gptq_jax.GPTQConfig, got {type(cfg).__name__}")
  adapter = resolve_adapter(params, model_config, adapter)
  if cfg.gptaq and getattr(getattr(adapter, "config", None), "num_kv_shared_layers", 0):
    raise ValueError("GPTQConfig.gptaq=True is not supported for a model whose layers share "
                     "keys / values (Gemma 4 num_kv_shared_layers > 0): GPTAQ's float stream would "
                     "need the float producers' keys / values; quantize it without gptaq")
  experts.check_model(cfg, getattr(adapter, "config", None), layer_config)
  if cfg.rotation != "none" and start_block == 0:  # rotation.rotate_model must come first
    check_rotated(params, getattr(adapter, "config", None), getattr(adapter, "rotation", None),
                  cfg.rotation)
  mesh = resolve_mesh(mesh, axis_name)
  ndev = mesh.shape[axis_name] if mesh is not None else 1
  samples, largest = calib.normalize(calib_batches)
  calib.check_vocab(samples, getattr(getattr(adapter, "config", None), "vocab_size", None))
  batches = multihost.agree_batches(
      calib.micro_batches(samples, max(batch_size or largest, ndev), multiple=ndev))
  nblocks = adapter.num_blocks(params)
  if not 0 <= start_block <= nblocks:
    raise ValueError(f"start_block={start_block} must be in [0, {nblocks}]")

  st = stats or PipelineStats(sync=False)
  # block work is counted (each pass traced once per shape) only for a caller who reads the stats
  work_of = forward_work if stats is not None else (lambda *args: 0)
  t = time.perf_counter()
  stream = _Stream(adapter, params, batches, mesh, axis_name)
  t = st.mark("embedding", t, stream.hidden)
  total_tokens = float(sum(float(m.sum()) for m in stream.masks))  # the few-token fallback
  float_hidden = list(stream.hidden) if cfg.gptaq else None  # GPTAQ: the float model's stream
  # resumed GPTAQ: the float stream is run through the done blocks' float weights again, when the
  # adapter can read them (the CLI's streamed model can): the same stream as an unbroken run
  float_of = getattr(adapter, "get_float_block", None)
  if cfg.gptaq and start_block and float_of is None:
    warnings.warn(f"GPTAQ resumed at block {start_block}: the float stream starts from the "
                  "already quantized blocks' outputs (this adapter has no get_float_block to "
                  "read their float weights)", UserWarning, stacklevel=2)
  bar = BlockProgress(nblocks, enabled=progress)
  bar.skip(start_block)
  spread = solve_mesh(spread_solves)
  plan = StashPlan(stash_bytes, mesh, mesh.devices.size if mesh is not None else 1)
  kept = out = None
  for i in range(nblocks):
    blk = block_adapter(adapter, i)  # one per layer kind: its compiled functions are shared
    run = runner_for(blk, mesh, axis_name)
    groups = blk.sequential_groups if cfg.true_sequential else (
        tuple(p for g in blk.sequential_groups for p in g),)
    calib_blk = experts.calibration_adapter(blk, cfg)  # moe_routing: the Hessian passes only
    captures = [(cross_capture_for if cfg.gptaq else capture_for)(calib_blk, g, mesh, axis_name)
                for g in groups]
    t = time.perf_counter()
    block = adapter.get_block(params, i)
    t = st.mark("read blocks", t, block)
    work = dense_block(block)
    float_work = work if cfg.gptaq else None  # GPTAQ: block i still float
    if cfg.gptaq and i < start_block and float_of is not None:
      float_work = dense_block(float_of(params, i))  # a done block's float weights
    if i >= start_block:
      records: list[dict] = []
      st.work("one block forward", len(stream.hidden) * work_of(
          blk, work, stream.hidden[0], stream.ctx[0]))
      kept = [{} for _ in stream.hidden]  # per micro-batch: {path: kept input} (stash.py)
      for g, (group, capture) in enumerate(zip(groups, captures)):
        capture.reset()
        replicated = stream.replicate(work)
        for k, (h, ctx, mask) in enumerate(zip(stream.hidden, stream.ctx, stream.masks)):
          if float_hidden is not None:  # GPTAQ: the float block's inputs too; nothing kept
            if k == 0:
              st.work("hessian passes", 2 * len(stream.hidden) * work_of(blk, work, h, ctx, group))
            capture.add(replicated, h, ctx, mask, float_params=float_work,
                        float_hidden=float_hidden[k])
            continue
          if k == 0:
            keep = plan.decide(g, capture, (replicated, h, ctx, mask), kept[0], len(kept))
            st.work("hessian passes", len(kept) * work_of(blk, work, h, ctx, group, kept[0]))
          out = capture.add(replicated, h, ctx, mask, given=kept[k], keep=keep)
          if keep:
            kept[k] = {**kept[k], **given_for(capture, group, out)}
        del replicated
        t = st.mark("hessian passes", t, capture.states)
        st.count("hessian passes")
        # The solves read the float kernels of `block`, not `work`: its dequantized copies are
        # dropped meanwhile (the solves' workspace is the block's host-memory peak) and made
        # again after, the same values (_working_copy).
        dtype, work = _float_dtype(block), None
        handed = [block]  # _quantize_group holds the only reference: each float kernel is
        del block         # freed once its layer is packed
        block, _ = _quantize_group(capture, handed.pop(), None, group, cfg, i, bar, records,
                                   layer_config, spread, total_tokens)
        work = _working_copy(block, dtype)
        t = st.mark("solves", t, work)
        capture.reset()
      if cfg.refine_steps:  # optax block-wise refinement against the float block (refine.py)
        block = refine_stream(blk, adapter.get_block(params, i), block, stream, cfg, i, records)
        work = dense_block(block)
      params = adapter.set_block(params, i, block)
      if report is not None:
        report.extend(records)
    t = time.perf_counter()
    if i + 1 < nblocks or cfg.lm_head:  # the last block's outputs feed only lm_head
      if kept is None or cfg.refine_steps or not any(kept):  # the block from its input
        kept = None
      inputs = stream.propagate(run, work, kept)
      if i >= start_block:
        st.work("propagation", len(stream.ctx) * work_of(
            blk, work, stream.hidden[0], stream.ctx[0], None, kept[0] if kept else None))
      if float_hidden is not None:
        float_hidden = [run(float_work, h, c) for h, c in zip(float_hidden, stream.ctx)]
      stream.advance(ctx_advancer_for(adapter, i, mesh, axis_name), work, inputs)  # Gemma 4
      inputs = None
      t = st.mark("propagation", t, stream.hidden)
      st.count("propagation passes")
    if i >= start_block:
      st.count("blocks quantized")
      bar.update(i, finished=True)
      if on_block_done is not None:
        on_block_done(i, block, records)
        st.mark("write blocks", t)
    # nothing of block i stays referenced while block i + 1 is read (a streamed model holds
    # one block's weights at a time)
    block = work = float_work = kept = out = None
  st.stash = plan.summary()
  if cfg.lm_head:  # after the last block, on the final norm's outputs (pipeline/dynamic.py)
    params = dynamic.quantize_lm_head(adapter.config, params, stream.hidden, stream.masks, cfg,
                                      report, getattr(adapter, "lm_head_slices", None),
                                      mesh=mesh, axis_name=axis_name, float_hidden=float_hidden)
  return params
