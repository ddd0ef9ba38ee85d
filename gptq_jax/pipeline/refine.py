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

**What it trains on, and which step is kept.** The last ``max(1, n // 8)`` calibration samples
are held out of the optimisation (with one sample, it is used for both). Training uses only the
first ``cfg.refine_seqlen`` tokens of each other sample: a causal block's outputs there depend on
those tokens alone, so the cut is exact (the same outputs as in the whole window) and a step costs
``refine_seqlen / seqlen`` of a whole-window step. Half-way and at the last step
(``HELD_CHECKS``), inside the jitted loop, the block's error on the held-out samples (whole
windows) is measured and the parameters of the best step so far are carried; step 0 is GPTQ's own
result, so the kept parameters never have a higher held-out error than GPTQ alone — the decision
is made per block. (A check is a whole-window forward of the held-out rows: with 32 x 512
calibration, four checks plus step 0 were about 30 % of the loop's arithmetic against 32 steps of
2 x 128 tokens, and the best step was the last one in nearly every SmolLM2 block.)
Each step uses ``cfg.refine_batch`` training samples chosen by a seeded permutation
(deterministic with ``cfg.seed``). The whole loop (steps, held-out checks, best-step selection) is
one compiled call with no host round trip; the float block's targets are computed once per block,
on the cut training samples and the held-out windows only. Every compiled function (the loop, the
targets' block run, the per-layer measure, the final codes) is cached per layer type and setting,
so a model compiles them once, not once per block. The per-layer errors of the report are measured
on the held-out samples' training prefixes. The data is gathered on one device (refinement is not
data-parallel).
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gptq_jax.config import GPTQConfig
from gptq_jax.core.weights import PackedWeight, QuantizedWeight
from gptq_jax.pipeline.adapter import DecoderAdapter, LinearPath, get_path, set_path

HIGHEST = jax.lax.Precision.HIGHEST
HELD_CHECKS = 2  # held-out checks per block: half-way and at the last step


class _Static(NamedTuple):
  """Hashable settings of the compiled refinement loop."""

  paths: tuple[LinearPath, ...]
  maxq: int
  steps: int
  lr: float
  rounding: bool
  checks: int = HELD_CHECKS  # held-out checks in the loop (the last one at the last step)


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


def _ste_round(x):
  """round(x) forward, identity backward (straight-through)."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _frozen(qw: QuantizedWeight, w_float) -> dict[str, jax.Array]:
  groups = qw.scales.shape[0]
  return {"codes": qw.codes.astype(jnp.float32), "scales": qw.scales.astype(jnp.float32),
          "zeros": qw.zeros.astype(jnp.float32), "g_idx": qw.g_idx, "w": w_float,
          "onehot": (qw.g_idx[:, None] == jnp.arange(groups)).astype(jnp.float32)}


def _grid(theta_p, frozen_p):
  """Per-row scale and zero, ``[in, out]`` each, for the current parameters. The scales' rows are
  picked by a one-hot matmul (exact: one nonzero term per sum), whose gradient is a matmul too;
  a gather's gradient is a scatter-add, slow on CPU."""
  s = frozen_p["scales"] * jnp.exp(theta_p["log_scale"])  # [groups, out]
  rows = jnp.matmul(frozen_p["onehot"], s, precision=HIGHEST)
  return rows, jnp.take(frozen_p["zeros"], frozen_p["g_idx"], axis=0)


def _codes(theta_p, frozen_p, st: _Static, ste: bool):
  """Integer codes (as float) ``[in, out]``: GPTQ's, or the learnt rounding of the float weight."""
  if not st.rounding:
    return frozen_p["codes"]
  rnd = _ste_round if ste else jnp.round
  return jnp.clip(frozen_p["codes"] + rnd(theta_p["v"]), 0, st.maxq)


def _kernels(theta, frozen, st: _Static, ste: bool = True):
  """Dequantized kernels ``{path: [in, out]}`` (differentiable in ``theta``)."""
  out = {}
  for p in st.paths:
    s, z = _grid(theta[p], frozen[p])
    out[p] = s * (_codes(theta[p], frozen[p], st, ste) - z)
  return out


def _with_kernels(block, kernels):
  for p, k in kernels.items():
    block = set_path(block, p + ("kernel",), k)
  return block


def _block_sq_err(adapter, block, kernels, h, ctx, mask, y, w_float=None):
  """Summed squared output error over unmasked tokens, and (with ``w_float``) each linear's
  summed ``||x (K_q - K_float)||^2`` on its inputs in this block run."""
  layer = {}

  def capture(path, x):
    if w_float is not None and path in kernels:
      d = jnp.matmul(x, kernels[path] - w_float[path], precision=HIGHEST)
      layer[path] = jnp.sum(jnp.sum(d * d, axis=-1) * mask)

  out = adapter.run_block(_with_kernels(block, kernels), h, ctx,
                          capture if w_float is not None else None)
  d = (out - y).astype(jnp.float32)
  return jnp.sum(jnp.sum(d * d, axis=-1) * mask), layer


@functools.lru_cache(maxsize=16)
def _compiled(adapter: DecoderAdapter, st: _Static):
  """(train, evaluate, the block run for the targets, the final codes), jitted for one adapter
  (layer type) and setting; reused by every block of that type."""
  scale_opt = optax.adam(optax.linear_schedule(st.lr, 0.0, st.steps))
  round_opt = optax.sign_sgd(optax.linear_schedule(2.0 / st.steps, 0.0, st.steps))
  every = max(1, st.steps // st.checks)

  def loss_fn(theta, frozen, block, h, ctx, mask, y):
    sq, _ = _block_sq_err(adapter, block, _kernels(theta, frozen, st), h, ctx, mask, y)
    return sq / (jnp.maximum(jnp.sum(mask), 1.0) * y.shape[-1])

  def pack(scales, rounds):
    return {p: {"log_scale": scales[p], **({"v": rounds[p]} if st.rounding else {})}
            for p in st.paths}

  @jax.jit
  def train(theta, frozen, block, hidden, ctx, mask, y, order, h_args):
    """``hidden, ctx, mask, y``: the training samples; ``order: [steps, batch]`` indices into
    them; ``h_args = (hidden, ctx, mask, y)`` of the held-out samples. Returns (the best step's
    ``theta``, its held-out MSE, GPTQ's held-out MSE, the best step)."""
    take = lambda idx: lambda a: jnp.take(a, idx, axis=0)

    def held_mse(th):
      sq, _ = _block_sq_err(adapter, block, _kernels(th, frozen, st, ste=False), *h_args)
      return sq / (jnp.maximum(jnp.sum(h_args[2]), 1.0) * y.shape[-1])

    scales = {p: t["log_scale"] for p, t in theta.items()}
    rounds = {p: t["v"] for p, t in theta.items()} if st.rounding else {}
    base = held_mse(theta)
    state = (scales, rounds, scale_opt.init(scales), round_opt.init(rounds), theta, base,
             jnp.zeros((), jnp.int32))

    def step(i, state):
      scales, rounds, s_state, r_state, best, best_err, best_step = state
      pick = take(order[i])
      g = jax.grad(loss_fn)(pack(scales, rounds), frozen, block, pick(hidden),
                            jax.tree.map(pick, ctx), pick(mask), pick(y))
      upd, s_state = scale_opt.update({p: g[p]["log_scale"] for p in st.paths}, s_state)
      scales = optax.apply_updates(scales, upd)
      if st.rounding:
        upd, r_state = round_opt.update({p: g[p]["v"] for p in st.paths}, r_state)
        rounds = jax.tree.map(lambda v: jnp.clip(v, -1.0, 1.0), optax.apply_updates(rounds, upd))

      def check(carry):
        best, best_err, best_step = carry
        th = pack(scales, rounds)
        err = held_mse(th)
        better = err < best_err
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), th, best)
        return best, jnp.where(better, err, best_err), jnp.where(better, i + 1, best_step)

      due = ((i + 1) % every == 0) | (i + 1 == st.steps)
      best, best_err, best_step = jax.lax.cond(due, check, lambda c: c,
                                               (best, best_err, best_step))
      return scales, rounds, s_state, r_state, best, best_err, best_step

    *_, best, best_err, best_step = jax.lax.fori_loop(0, st.steps, step, state)
    return best, best_err, base, best_step

  @jax.jit
  def evaluate(theta, frozen, block, h, ctx, mask, y):
    """Summed squared block error, per-layer summed errors, token count for one chunk."""
    w_float = {p: frozen[p]["w"] for p in st.paths}
    sq, layer = _block_sq_err(adapter, block, _kernels(theta, frozen, st, ste=False), h, ctx,
                              mask, y, w_float)
    return sq, layer, jnp.sum(mask)

  return train, evaluate, jax.jit(adapter.run_block), jax.jit(functools.partial(_final, st=st))


def _init_theta(frozen, st: _Static):
  theta = {}
  for p, f in frozen.items():
    t = {"log_scale": jnp.zeros_like(f["scales"])}
    if st.rounding:
      t["v"] = jnp.zeros_like(f["codes"])
    theta[p] = t
  return theta


def _measure(evaluate, theta, frozen, block, hidden, ctx, mask, y, batch: int):
  """Mean block MSE per element and mean per-layer error per token over all samples (chunked)."""
  sq, layer, count = 0.0, {}, 0.0
  n = hidden.shape[0]
  for a in range(0, n, batch):
    sl = lambda x: x[a:a + batch]
    s, l, c = evaluate(theta, frozen, block, sl(hidden), jax.tree.map(sl, ctx), sl(mask), sl(y))
    sq, count = sq + float(s), count + float(c)
    for p, v in l.items():
      layer[p] = layer.get(p, 0.0) + float(v)
  count = max(count, 1.0)
  return sq / (count * hidden.shape[-1]), {p: v / count for p, v in layer.items()}


def refine_block(adapter: DecoderAdapter, float_block: Any, qblock: Any, hidden, ctx, mask,
                 cfg: GPTQConfig, index: int = 0) -> tuple[Any, RefineInfo]:
  """Tune the quantization parameters of one GPTQ-quantized block against the float block.

  Args:
    adapter: the model's ``DecoderAdapter`` (its ``sequential_groups`` name the linears).
    float_block: the block's float parameters (the target function).
    qblock: the same block with every linear's ``"kernel"`` a ``PackedWeight``.
    hidden: the block's calibration inputs ``[n, seq, hidden]``; ``ctx`` the adapter's context
      pytree for them (batch-leading leaves); ``mask`` ``[n, seq]`` (1 = real token).
    cfg: ``refine_steps`` (> 0), ``refine_lr``, ``refine_rounding``, ``refine_batch``, ``bits``.
    index: the block's index: the minibatch order is seeded with ``(cfg.seed, index)``.

  Returns:
    ``(qblock', info)``: ``qblock'`` has a new ``PackedWeight`` per linear (same bits, group size,
    format and g_idx) when a refined step lowered the held-out error, else ``qblock`` itself.
  """
  if cfg.refine_steps <= 0:
    raise ValueError(f"refine_block needs cfg.refine_steps > 0, got {cfg.refine_steps}")
  t0 = time.perf_counter()
  paths = tuple(p for g in adapter.sequential_groups for p in g)
  for p in paths:
    if not isinstance(get_path(qblock, p)["kernel"], PackedWeight):
      raise ValueError(f"refine_block: {p} is not a PackedWeight; quantize the block first")
  st = _Static(paths, 2**cfg.bits - 1, int(cfg.refine_steps), float(cfg.refine_lr),
               bool(cfg.refine_rounding))
  train, evaluate, run, final = _compiled(adapter, st)
  dev = jax.local_devices()[0]
  put = lambda t: jax.device_put(t, dev)
  hidden, ctx, mask = put(hidden), put(ctx), put(jnp.asarray(mask, jnp.float32))
  float_block = put(float_block)
  packed = {p: get_path(qblock, p)["kernel"] for p in paths}
  frozen = put({p: _frozen(packed[p].unpack(), get_path(float_block, p)["kernel"].astype(
      jnp.float32)) for p in paths})
  n, seq = hidden.shape[:2]
  n_held = max(1, n // 8)
  n_train = n - n_held if n > 1 else 1
  batch = min(int(cfg.refine_batch), n_train)
  length = min(int(cfg.refine_seqlen) or seq, seq)  # training tokens per sample (a causal prefix)

  def samples(a, b, t):
    """Inputs of samples ``a:b`` cut to their first ``t`` tokens (every ``[n, seq, ...]`` leaf),
    and the float block's outputs on them (the targets), a few samples per call."""
    cut = lambda x: x[a:b, :t] if x.ndim >= 2 and x.shape[:2] == (n, seq) else x[a:b]
    h, c, m = cut(hidden), jax.tree.map(cut, ctx), cut(mask)
    y = jnp.concatenate([run(float_block, h[k:k + 8], jax.tree.map(lambda x: x[k:k + 8], c))
                         for k in range(0, b - a, 8)])
    return h, c, m, y

  train_set = samples(0, n_train, length)
  held_set = samples(n - n_held, n, seq)  # held out of the optimisation, whole windows

  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), index),
                          -(-st.steps * batch // n_train))
  order = jnp.concatenate([jax.random.permutation(k, n_train) for k in keys])
  order = order[:st.steps * batch].reshape(st.steps, batch)  # [steps, batch] sample indices
  theta0 = _init_theta(frozen, st)
  theta, mse1, mse0, best_step = train(theta0, frozen, float_block, *train_set, order, held_set)
  best_step = int(best_step)  # the one host round trip of the loop
  kept = best_step > 0
  # per-layer errors (a diagnostic for the report): on the held-out samples' training prefixes
  h_args = (float_block, *_prefix(held_set, length))
  _, layer0 = _measure(evaluate, theta0, frozen, *h_args, n_held)
  layer1 = _measure(evaluate, theta, frozen, *h_args, n_held)[1] if kept else layer0
  if kept:
    kernels = final(theta, frozen)
    for p in paths:
      codes, scales = kernels[p]
      old = packed[p]
      qw = QuantizedWeight(codes=codes, scales=scales.astype(old.scales.dtype),
                           zeros=frozen[p]["zeros"].astype(jnp.int32), g_idx=old.g_idx,
                           bits=old.bits, group_size=old.group_size)
      qblock = set_path(qblock, p + ("kernel",), qw.pack(old.format))
  mse0 = float(mse0)
  info = RefineInfo(mse0, float(mse1) if kept else mse0, kept, best_step, layer0, layer1,
                    time.perf_counter() - t0)
  return qblock, info


def _prefix(sample_set, t: int):
  """``(hidden, ctx, mask, y)`` cut to the first ``t`` tokens (every leaf with a token axis)."""
  n, seq = sample_set[0].shape[:2]
  if t >= seq:
    return sample_set
  return jax.tree.map(lambda x: x[:, :t] if x.ndim >= 2 and x.shape[:2] == (n, seq) else x,
                      sample_set)


def _final(theta, frozen, st: _Static):
  """``{path: (codes [in, out] uint8, scales [groups, out] f32)}`` from trained parameters."""
  out = {}
  for p in st.paths:
    codes = _codes(theta[p], frozen[p], st, ste=False)
    out[p] = (codes.astype(jnp.uint8), frozen[p]["scales"] * jnp.exp(theta[p]["log_scale"]))
  return out


def refine_stream(adapter: DecoderAdapter, float_block: Any, qblock: Any, stream: Any,
                  cfg: GPTQConfig, i: int, records: list[dict]) -> Any:
  """The driver's hook: refine block ``i`` on the calibration stream's current inputs and add the
  held-out block MSE and per-layer errors before / after (and the kept step) to the block's
  report ``records``."""
  cat = lambda *xs: jnp.concatenate([jax.device_put(x, jax.local_devices()[0]) for x in xs])
  hidden = cat(*stream.hidden)
  ctx = jax.tree.map(cat, *stream.ctx) if len(stream.ctx) > 1 else stream.ctx[0]
  mask = cat(*stream.masks)
  qblock, info = refine_block(adapter, float_block, qblock, hidden, ctx, mask, cfg,
                              index=i)
  for r in records:
    path = tuple(r["layer"].split(".")[2:])
    r.update({"refine_block_mse_before": info.mse_before,
              "refine_block_mse_after": info.mse_after, "refine_kept": info.kept,
              "refine_layer_err_before": info.layer_err_before.get(path),
              "refine_layer_err_after": info.layer_err_after.get(path),
              "refine_best_step": info.best_step,
              "refine_seconds": info.seconds})
  return qblock
