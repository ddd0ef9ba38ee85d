"""The compiled pieces of block refinement (``refine.py`` says what they do and why).

``compiled(adapter, static, mesh, axis_name)`` returns four functions, jitted once per layer type,
setting and mesh and reused by every block of that type:

* ``prepare``: each device's training rows (cut to their first ``length`` tokens) and held-out
  rows (whole windows) gathered from the rows it holds, with the float block's outputs on them
  (the targets), one sample at a time;
* ``train``: the whole Adam (and sign-SGD) loop with its held-out checks, one call, no host round
  trip; gradients, token counts and held-out errors are summed over the data axis;
* ``evaluate``: the block error and each linear's error on the held-out rows' prefixes;
* ``final``: the integer codes and scales of trained parameters.

With a mesh, ``prepare`` / ``train`` / ``evaluate`` run under ``shard_map`` over the data axis
(rows and row plans split, parameters replicated); without one, the same code runs on one device
(a data axis of size 1).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from gptq_jax.core.hessian import varying_like
from gptq_jax.core.weights import QuantizedWeight
from gptq_jax.pipeline.adapter import DecoderAdapter, LinearPath, set_path
from gptq_jax.pipeline.capture import map_samples

HIGHEST = jax.lax.Precision.HIGHEST
HELD_CHECKS = 2  # held-out checks per block: half-way and at the last step


class Static(NamedTuple):
  """Hashable settings of the compiled refinement loop."""

  paths: tuple[LinearPath, ...]  # the quantized linears (float ones are not trained)
  maxq: tuple[int, ...]  # each linear's largest code, 2**bits - 1 of its own bit width
  steps: int
  lr: float
  rounding: bool
  length: int  # training tokens per sample (a causal prefix)
  checks: int = HELD_CHECKS  # held-out checks in the loop (the last one at the last step)


def ste_round(x):
  """round(x) forward, identity backward (straight-through)."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def frozen_of(qw: QuantizedWeight, w_float) -> dict[str, jax.Array]:
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


def codes_of(theta_p, frozen_p, rounding: bool, maxq: int, ste: bool):
  """Integer codes (as float) ``[in, out]``: GPTQ's, or GPTQ's moved by the learnt rounding
  offset, clipped to ``[0, maxq]`` (the linear's own bit width)."""
  if not rounding:
    return frozen_p["codes"]
  rnd = ste_round if ste else jnp.round
  return jnp.clip(frozen_p["codes"] + rnd(theta_p["v"]), 0, maxq)


def _kernels(theta, frozen, st: Static, ste: bool = True):
  """Dequantized kernels ``{path: [in, out]}`` (differentiable in ``theta``)."""
  out = {}
  for p, maxq in zip(st.paths, st.maxq):
    s, z = _grid(theta[p], frozen[p])
    out[p] = s * (codes_of(theta[p], frozen[p], st.rounding, maxq, ste) - z)
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


def init_theta(frozen, st: Static):
  theta = {}
  for p in st.paths:
    t = {"log_scale": jnp.zeros_like(frozen[p]["scales"])}
    if st.rounding:
      t["v"] = jnp.zeros_like(frozen[p]["codes"])
    theta[p] = t
  return theta


def _final(theta, frozen, st: Static):
  """``{path: (codes [in, out] uint8, scales [groups, out] f32)}`` from trained parameters."""
  out = {}
  for p, maxq in zip(st.paths, st.maxq):
    codes = codes_of(theta[p], frozen[p], st.rounding, maxq, ste=False)
    out[p] = (codes.astype(jnp.uint8), frozen[p]["scales"] * jnp.exp(theta[p]["log_scale"]))
  return out


def _cut(tree, idx, valid, t: int, rows: int, seq: int):
  """The rows ``idx`` of every ``[rows, ...]`` leaf, cut to ``t`` tokens where a leaf has a token
  axis; the mask (the last element of ``tree``) zeroed on invalid slots."""
  def one(a):
    a = jnp.take(a, idx, axis=0)
    return a[:, :t] if a.ndim >= 2 and a.shape[1] == seq else a
  *rest, mask = jax.tree.map(one, tree)
  return (*rest, mask * valid[:, None])


def _loop(adapter, st: Static, reduce, theta, frozen, block, train_set, held_set, order):
  """The optimisation (see the module docstring); ``reduce`` sums over the data axis."""
  scale_opt = optax.adam(optax.linear_schedule(st.lr, 0.0, st.steps))
  round_opt = optax.sign_sgd(optax.linear_schedule(2.0 / st.steps, 0.0, st.steps))
  every = max(1, st.steps // st.checks)
  width = train_set[3].shape[-1]  # hidden size: the errors are per element
  hidden, ctx, mask, y = train_set

  def held_mse(th):
    sq, _ = _block_sq_err(adapter, block, _kernels(th, frozen, st, ste=False), *held_set)
    return reduce(sq) / (jnp.maximum(reduce(jnp.sum(held_set[2])), 1.0) * width)

  def pack(scales, rounds):
    return {p: {"log_scale": scales[p], **({"v": rounds[p]} if st.rounding else {})}
            for p in st.paths}

  def grads(th, pick):
    local = lambda t: _block_sq_err(adapter, block, _kernels(t, frozen, st), pick(hidden),
                                    jax.tree.map(pick, ctx), pick(mask), pick(y))[0]
    g = reduce(jax.grad(local)(varying_like(th, hidden)))
    n = reduce(jnp.sum(pick(mask)))
    return jax.tree.map(lambda a: a / (jnp.maximum(n, 1.0) * width), g)

  scales = {p: t["log_scale"] for p, t in theta.items()}
  rounds = {p: t["v"] for p, t in theta.items()} if st.rounding else {}
  base = held_mse(theta)
  state = (scales, rounds, scale_opt.init(scales), round_opt.init(rounds), theta, base,
           jnp.zeros((), jnp.int32))

  def step(i, state):
    scales, rounds, s_state, r_state, best, best_err, best_step = state
    g = grads(pack(scales, rounds), lambda a: jnp.take(a, order[i], axis=0))
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
    best, best_err, best_step = jax.lax.cond(due, check, lambda c: c, (best, best_err, best_step))
    return scales, rounds, s_state, r_state, best, best_err, best_step

  *_, best, best_err, best_step = jax.lax.fori_loop(0, st.steps, step, state)
  return best, best_err, base, best_step


@functools.lru_cache(maxsize=16)
def compiled(adapter: DecoderAdapter, st: Static, mesh: Mesh | None, axis_name: str):
  """``(prepare, train, evaluate, final)`` (see the module docstring)."""
  reduce = (lambda x: jax.lax.psum(x, axis_name)) if mesh is not None else (lambda x: x)
  own = lambda tree: jax.tree.map(lambda a: a[0], tree)  # this device's row of a plan array

  def prepare(hidden, ctx, mask, float_block, plan):
    """``hidden``, ``ctx``, ``mask``: the micro-batches (this device's rows); ``plan``:
    (train, train_valid, held, held_valid) of this device."""
    train, train_valid, held, held_valid = own(plan)
    cat = lambda *xs: jnp.concatenate(xs)
    rows = (cat(*hidden), jax.tree.map(cat, *ctx), cat(*mask).astype(jnp.float32))
    n, seq = rows[0].shape[:2]

    def take(idx, valid, t):
      h, c, m = _cut(rows, idx, valid, t, n, seq)
      return h, c, m, map_samples(functools.partial(adapter.run_block, float_block), h, c)

    return take(train, train_valid, st.length), take(held, held_valid, seq)

  def train(theta, frozen, block, train_set, held_set, order):
    return _loop(adapter, st, reduce, theta, frozen, block, train_set, held_set, own(order))

  def evaluate(theta, frozen, block, held_set):
    """Summed squared block error, per-layer summed errors and token count on the held-out
    rows' training prefixes, summed over the data axis."""
    h, c, m, y = held_set
    t = min(st.length, h.shape[1])
    cut = lambda a: a[:, :t] if a.ndim >= 2 and a.shape[1] == h.shape[1] else a
    h, c, m, y = cut(h), jax.tree.map(cut, c), cut(m), cut(y)
    w_float = {p: frozen[p]["w"] for p in st.paths}
    sq, layer = _block_sq_err(adapter, block, _kernels(theta, frozen, st, ste=False), h, c, m, y,
                              w_float)
    return reduce(sq), reduce(layer), reduce(jnp.sum(m))

  if mesh is not None:
    data, rep = P(axis_name), P()
    prepare = jax.shard_map(prepare, mesh=mesh, in_specs=(data, data, data, rep, data),
                            out_specs=data)
    train = jax.shard_map(train, mesh=mesh, in_specs=(rep, rep, rep, data, data, data),
                          out_specs=rep)
    evaluate = jax.shard_map(evaluate, mesh=mesh, in_specs=(rep, rep, rep, data),
                             out_specs=rep)
  return (jax.jit(prepare), jax.jit(train), jax.jit(evaluate),
          jax.jit(functools.partial(_final, st=st)))
