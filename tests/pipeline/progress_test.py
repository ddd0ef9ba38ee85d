"""The per-block progress line: bar, elapsed, ETA from the blocks done in this run, layer losses."""

import io

from gptq_jax.pipeline.progress import BlockProgress


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_log_lines_one_per_block_with_eta_and_max_loss():
  out, clock = io.StringIO(), _Clock()
  bar = BlockProgress(4, stream=out, width=8, clock=clock)
  clock.t = 10.0
  bar.update(0, "self_attn.q_proj", 0.5)
  bar.update(0, "mlp.down_proj", 2.0)
  bar.update(0, "mlp.up_proj", 1.0)
  assert out.getvalue() == ""  # not a terminal: nothing until the block is done
  bar.update(0, finished=True)
  clock.t = 20.0
  bar.update(1, "mlp.up_proj", 0.25)
  bar.update(1, finished=True)
  clock.t = 23.0  # after the first block (compilation), the pace is that of the later blocks
  bar.update(2, finished=True)
  assert out.getvalue().splitlines() == [
      "[block 0/3] ##------  25% 10s elapsed ETA 30s | max layer loss 2 (mlp.down_proj)",
      "[block 1/3] ####----  50% 20s elapsed ETA 20s | max layer loss 0.25 (mlp.up_proj)",
      "[block 2/3] ######--  75% 23s elapsed ETA 6s",
  ]


def test_resumed_blocks_do_not_count_towards_the_eta():
  out, clock = io.StringIO(), _Clock()
  bar = BlockProgress(10, stream=out, width=10, clock=clock)
  bar.skip(6)
  clock.t = 90.0
  bar.update(6, "mlp.down_proj", float("nan"))  # an RTN fallback's loss is not a maximum
  bar.update(6, finished=True)
  assert out.getvalue() == "[block 6/9] #######---  70% 1m30s elapsed ETA 4m30s\n"


def test_terminal_redraws_each_layer_and_keeps_each_block():
  out, clock = _Tty(), _Clock()
  bar = BlockProgress(2, stream=out, width=4, clock=clock)
  bar.update(0, "self_attn.q_proj", 0.125)
  clock.t = 3700.0
  bar.update(0, finished=True)
  assert not BlockProgress(2, enabled=False, stream=out).update(1, "x", 1.0)
  first, second = out.getvalue().split("\r")[1:]
  assert first.rstrip() == "[block 0/1] ----   0% 0s elapsed ETA ? | self_attn.q_proj loss 0.125"
  assert second.endswith("\n") and second.rstrip() == (
      "[block 0/1] ##--  50% 1h01m40s elapsed ETA 1h01m40s | max layer loss 0.125 "
      "(self_attn.q_proj)")
