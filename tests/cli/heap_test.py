"""The CLI's frozen heap (cli/stream.py): ``freeze_heap`` leaves what is alive out of later
collections and ``thaw_heap`` undoes exactly that; objects a caller froze itself are left frozen."""

import gc

from gptq_jax.cli import stream


def test_freeze_then_thaw_and_a_callers_freeze_is_kept():
  assert gc.get_freeze_count() == 0
  stream.freeze_heap()
  try:
    assert gc.get_freeze_count() > 0
    stream.trim_heap()  # the per-block collection still runs
  finally:
    stream.thaw_heap()
  assert gc.get_freeze_count() == 0
  gc.freeze()  # a caller that froze its own objects
  try:
    stream.freeze_heap()
    assert stream._FROZEN == [False]  # it froze nothing, so thaw_heap thaws nothing
    stream.thaw_heap()
    assert gc.get_freeze_count() > 0  # (the count itself drops as frozen objects are freed)
  finally:
    gc.unfreeze()
