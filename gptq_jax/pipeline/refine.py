"""Block-wise refinement of GPTQ's quantization parameters with optax (after a block is quantized).

GPTQ fits each linear on its own (a layer-wise objective); refinement then tunes the block's
quantization parameters jointly to minimise the block's output error, as AutoRound-style methods
do, while keeping every linear a valid ``PackedWeight`` (same bits, group size, format, g_idx):

* **Scales** ``[groups, out]``: learnt multiplicatively, ``s = s0 * exp(a)`` with ``a`` initialised
  to 0 (GPTQ's scale) and trained with Adam (``cfg.refine_lr``, linearly decayed to 0).
* **Zero points** (asymmetric grids): kept fixed at GPTQ's integers. A continuous zero rounded back
  at the end would shift every weight of its group by up to half a step, undoing the tuning; a
  fixed zero keeps the codes valid by construction.
* **Codes**: GPTQ's integer codes, fixed — unless ``cfg.refine_rounding``: then each weight gets a
  learnable offset ``v`` in ``[-1, 1]`` (in the spirit of AutoRound, arXiv:2309.05516) and its code
  is ``clamp(Q + round(v), 0, maxq)`` around **GPTQ's code** ``Q``, trained by signed gradient
  descent (``optax.sign_sgd``, rate ``2 / steps`` decayed to 0) through a straight-through round.
  ``v`` starts at 0, so the starting point is GPTQ's result with its error compensation (rounding
  the float weight ``W / s`` instead would throw the compensation away), and a code moves by at
  most one step, where the block's error consistently asks for it.

The objective is the mean squared error of the block's output against the **float block's output
on the same inputs**: the calibration hidden states that the already-quantized blocks produced
(the stream GPTQ itself quantizes against). Matching the float model's own activation stream
instead would need a second stream kept alive through the whole model; on the quantized stream a
block learns to reproduce the float block's function where it is actually used, and memory stays
one block's inputs and targets (plus the minibatch's activations for the gradient).

**What it trains on, and which step is kept.** One calibration sample in eight (the real samples
whose index is 7 mod 8; the last one with fewer than 8; ``refine_rows.py``) is held out of the
optimisation (with one sample, it is used for both); padding rows are never used. Training uses
only the first ``cfg.refine_seqlen`` tokens of each other sample: a causal block's outputs there
depend on those tokens alone, so the cut is exact (the same outputs as in the whole window) and a
step costs ``refine_seqlen / seqlen`` of a whole-window step. Half-way and at the last step
(``HELD_CHECKS``), inside the jitted loop, the block's error on the held-out samples (whole
windows) is measured and the parameters of the best step so far are carried; step 0 is GPTQ's own
result, so the kept parameters never have a higher held-out error than GPTQ alone — the decision
is made per block. (A check is a whole-window forward of the held-out rows: with 32 x 512
calibration, four checks plus step 0 were about 30 % of the loop's arithmetic against 32 steps of
2 x 128 tokens, and the best step was the last one in nearly every SmolLM2 block.)
Each step uses ``cfg.refine_batch`` training samples chosen by a seeded permutation
(deterministic with ``cfg.seed``; on several devices ``ceil(refine_batch / devices)`` per device,
below). The whole loop (steps, held-out checks, best-step selection) is
one compiled call with no host round trip; the float block's targets are computed once per block,
on the cut training samples and the held-out windows only. Every compiled function (the loop, the
targets' block run, the per-layer measure, the final codes) is cached per layer type and setting,
so a model compiles them once, not once per block. The per-layer errors of the report are measured
on the held-out samples' training prefixes.

**Data-parallel, like the Hessians.** With a mesh the calibration rows stay on the devices that
hold them: each device computes its own rows' block error and its gradient, and a ``psum`` over
the data axis adds the gradients, the token counts and the held-out errors, so every device (and
every process) takes the same optimisation step and keeps the same parameters: the same codes
everywhere. Each device draws its own training rows (``refine_rows.py``), so a run on several
devices trains on other minibatches than one device: the result stays within the tolerance of a
stochastic optimiser of the one-device run, not bit-equal to it.

**Per-module precision.** Each linear keeps its own bit width (``dynamic`` overrides: codes
clipped to ``2**bits - 1`` of that linear), and linears left float (``-:`` rules) are not trained
(they keep the float block's weights); a block with no quantized linear is left as it is.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gptq_jax.config import GPTQConfig
from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.pipeline import multihost, refine_rows
from gptq_jax.pipeline.adapter import DecoderAdapter, LinearPath, get_path, set_path
from gptq_jax.pipeline.capture import local_copy
from gptq_jax.pipeline.refine_loop import HELD_CHECKS, Static, compiled, frozen_of, init_theta

__all__ = ["HELD_CHECKS", "RefineInfo", "refine_block", "refine_stream"]


class RefineInfo(NamedTuple):
  """Block output MSE on the held-out samples for GPTQ's parameters (before) and the kept step's
  (after), per-layer errors on the same samples, and timing."""

  mse_before: float
  mse_after: float
  kept: bool  # True when a refined step was kept (it lowered the held-out error)
  best_step: int  # the kept step (0 = GPTQ's parameters)
  layer_err_before: dict[LinearPath, float]  # mean ||x (K_q - K_float)||^2 per token, per layer
  layer_err_after: dict[LinearPath, float]
  seconds: float


def _quantized_paths(adapter: DecoderAdapter, qblock: Any) -> tuple[LinearPath, ...]:
  """The block's linears that are ``PackedWeight``s (float ones, ``-:`` rules, are skipped)."""
  paths = tuple(p for g in adapter.sequential_groups for p in g)
  return tuple(p for p in paths if isinstance(get_path(qblock, p)["kernel"], PackedWeight))


def _static(paths, qblock, cfg: GPTQConfig, seq: int) -> Static:
  maxq = tuple(2**get_path(qblock, p)["kernel"].bits - 1 for p in paths)
  return Static(paths, maxq, int(cfg.refine_steps), float(cfg.refine_lr),
                bool(cfg.refine_rounding), min(int(cfg.refine_seqlen) or seq, seq))


def _refine(adapter, float_block, qblock, paths, rows, cfg: GPTQConfig, index: int,
            mesh: Mesh | None, axis_name: str) -> tuple[Any, RefineInfo]:
  """``rows = (hidden, ctx, masks, ids)``: the micro-batches (sharded over the data axis with a
  mesh) and their calibration sample indices."""
  t0 = time.perf_counter()
  hidden, ctx, masks, ids = rows
  devices = 1 if mesh is None else mesh.shape[axis_name]
  st = _static(paths, qblock, cfg, hidden[0].shape[1])
  plan = refine_rows.plan([multihost.host_value(i) for i in ids], devices, steps=st.steps,
                          batch=int(cfg.refine_batch), seed=cfg.seed, block=index)
  prepare, train, evaluate, final = compiled(adapter, st, mesh, axis_name)
  put = ((lambda t: jax.tree.map(jnp.asarray, t)) if mesh is None else
         (lambda t: multihost.per_device_put(mesh, axis_name, t)))
  rep = (lambda t: t) if mesh is None else (lambda t: multihost.replicate(mesh, t))
  packed = {p: get_path(qblock, p)["kernel"] for p in paths}
  frozen = {p: frozen_of(packed[p].unpack(), get_path(float_block, p)["kernel"].astype(
      jnp.float32)) for p in paths}
  block, frozen_r = rep(float_block), rep(frozen)
  train_set, held_set = prepare(list(hidden), list(ctx), list(masks), block,
                                put((plan.train, plan.train_valid, plan.held, plan.held_valid)))
  _check_tokens(train_set, held_set)
  theta0 = rep(init_theta(frozen, st))
  theta, mse1, mse0, best_step = train(theta0, frozen_r, block, train_set, held_set,
                                       put(plan.order))
  best_step = int(np.asarray(local_copy(best_step)))  # the one host round trip of the loop
  kept = best_step > 0
  _, layer0, count = evaluate(theta0, frozen_r, block, held_set)
  layer1 = evaluate(theta, frozen_r, block, held_set)[1] if kept else layer0
  per_token = lambda layer: {p: float(local_copy(v)) / max(float(local_copy(count)), 1.0)
                             for p, v in layer.items()}
  if kept:
    kernels = final(jax.tree.map(local_copy, theta), frozen)
    for p in paths:
      codes, scales = kernels[p]
      old = packed[p]
      qw = QuantizedWeight(codes=codes, scales=scales.astype(old.scales.dtype),
                           zeros=frozen[p]["zeros"].astype(jnp.int32), g_idx=old.g_idx,
                           bits=old.bits, group_size=old.group_size)
      qblock = set_path(qblock, p + ("kernel",), qw.pack(old.format))
  mse0 = float(local_copy(mse0))
  info = RefineInfo(mse0, float(local_copy(mse1)) if kept else mse0, kept, best_step,
                    per_token(layer0), per_token(layer1), time.perf_counter() - t0)
  return qblock, info


def _check_tokens(train_set, held_set) -> None:
  """A clear error when the training or held-out rows have no real token (the errors would be 0
  and nothing ever kept)."""
  for name, sample_set in (("held-out", held_set), ("training", train_set)):
    if float(np.asarray(local_copy(_token_count(sample_set[2])))) <= 0:
      raise ValueError(f"block refinement: the {name} calibration rows have no real token"
                       + (" in their first refine_seqlen tokens (left-padded samples?): use a "
                          "larger refine_seqlen (0 = whole windows)" if name == "training" else ""))


@jax.jit
def _token_count(mask):
  return jnp.sum(mask)


def refine_block(adapter: DecoderAdapter, float_block: Any, qblock: Any, hidden, ctx, mask,
                 cfg: GPTQConfig, index: int = 0) -> tuple[Any, RefineInfo]:
  """Tune the quantization parameters of one GPTQ-quantized block against the float block (on
  one device).

  Args:
    adapter: the model's ``DecoderAdapter`` (its ``sequential_groups`` name the linears).
    float_block: the block's float parameters (the target function).
    qblock: the same block with its quantized linears' ``"kernel"`` a ``PackedWeight`` (float
      linears are left as they are).
    hidden: the block's calibration inputs ``[n, seq, hidden]``; ``ctx`` the adapter's context
      pytree for them (batch-leading leaves); ``mask`` ``[n, seq]`` (1 = real token).
    cfg: ``refine_steps`` (> 0), ``refine_lr``, ``refine_rounding``, ``refine_batch``,
      ``refine_seqlen``, ``seed``.
    index: the block's index: the minibatch order is seeded with ``(cfg.seed, index)``.

  Returns:
    ``(qblock', info)``: ``qblock'`` has a new ``PackedWeight`` per quantized linear (same bits,
    group size, format and g_idx) when a refined step lowered the held-out error, else ``qblock``.
  """
  if cfg.refine_steps <= 0:
    raise ValueError(f"refine_block needs cfg.refine_steps > 0, got {cfg.refine_steps}")
  paths = _quantized_paths(adapter, qblock)
  if not paths:
    raise ValueError("refine_block: every linear of the block is float (not a PackedWeight): "
                     "quantize the block first")
  real = np.asarray(mask).any(axis=1)
  ids = np.where(real, np.cumsum(real) - 1, -1).astype(np.int32)
  dev = jax.local_devices()[0]
  put = lambda t: jax.device_put(t, dev)
  rows = ([put(hidden)], [put(ctx)], [put(jnp.asarray(mask))], [ids])
  return _refine(adapter, put(float_block), qblock, paths, rows, cfg, index, None, "data")


def refine_stream(adapter: DecoderAdapter, float_block: Any, qblock: Any, stream: Any,
                  cfg: GPTQConfig, i: int, records: list[dict]) -> Any:
  """The driver's hook: refine block ``i`` on the calibration stream's current inputs (where the
  stream's rows are: data-parallel over its mesh) and add the held-out block MSE and per-layer
  errors before / after (and the kept step) to the block's report ``records``. A block whose
  linears are all float is returned as it is."""
  paths = _quantized_paths(adapter, qblock)
  if not paths:
    return qblock
  rows = (stream.hidden, stream.ctx, stream.masks, stream.ids)
  qblock, info = _refine(adapter, float_block, qblock, paths, rows, cfg, i, stream.mesh,
                         stream.axis)
  for r in records:
    path = tuple(r["layer"].split(".")[2:])
    if path not in paths:
      continue
    r.update({"refine_block_mse_before": info.mse_before,
              "refine_block_mse_after": info.mse_after, "refine_kept": info.kept,
              "refine_layer_err_before": info.layer_err_before.get(path),
              "refine_layer_err_after": info.layer_err_after.get(path),
              "refine_best_step": info.best_step,
              "refine_seconds": info.seconds})
  return qblock
