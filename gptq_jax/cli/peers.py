"""A lost process is an error, not a hang: a watchdog for the CLI's ``jax.distributed`` runs.

When one process of a multi-process run dies (killed, preempted, out of memory), the others are
left waiting: in a collective (gloo fails at once with "connection reset"), at a barrier of the
coordination service (which waits), or for the coordinator itself. Left alone, ``jax.distributed``
notices only when its heartbeat times out, and then aborts the process (SIGABRT) without a word.

``PeerWatch`` makes that bounded and explicit. Every process writes a counter to the coordination
service's key-value store every ``BEAT_SECONDS`` and reads the others'; a thread that does no I/O
checks that each peer's counter moved (and that the store answered) within ``LOST_AFTER_SECONDS``
(``$GPTQ_JAX_LOST_AFTER_SECONDS`` sets another bound).
When one did not, it prints one line naming the process that went away and saying that
``--resume`` on every process continues (the blocks saved so far are whole: ``pipeline/
resume.py``), and ends the process at once (``os._exit``: the normal exit would wait for the lost
process in ``jax.distributed``'s shutdown barrier). A process whose main thread fails first (the
gloo error) asks the watchdog for its verdict (``explain``) before printing anything else. When
the coordinator (process 0) itself dies, ``jax.distributed`` ends the others at once with a fatal
log line and ``abort()``; a SIGABRT handler then adds the watchdog's line and exits with
``EXIT_CODE`` (the runtime's own lines come before it). Every survivor stops within ``LOST_AFTER_SECONDS`` plus a beat or two of the loss, well before the
coordination service's own heartbeat timeout (``jax.distributed.initialize``'s, 100 s).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

BEAT_SECONDS = 1.0
LOST_AFTER_SECONDS = 20.0
SLACK_SECONDS = 10.0  # beyond LOST_AFTER_SECONDS: a loaded machine runs the watchdog late
LOST_AFTER_ENV = "GPTQ_JAX_LOST_AFTER_SECONDS"  # another bound, in seconds (a slow network: more)
EXIT_CODE = 3
KEY = "gptq_jax/alive/{}"


def lost_message(process: int, count: int, why: str, output: str | None) -> str:
  where = f" in {output}.partial" if output else ""
  return (f"error: process {process} of {count} went away ({why}); stopping. The blocks saved "
          f"so far{where} stay valid: start every process again with the same flags and "
          "--resume to continue")


class PeerWatch:
  """Heartbeats through the coordination service's key-value store (see the module docstring).

  ``client``: ``jax.distributed``'s runtime client (``key_value_set``, ``key_value_try_get``).
  ``on_lost(process, why)`` is called once, from the watchdog thread, when a peer is lost; the
  default prints ``lost_message`` and ends the process.
  """

  def __init__(self, client: Any, process_id: int, num_processes: int, *,
               output: str | None = None, beat: float = BEAT_SECONDS,
               lost_after: float = LOST_AFTER_SECONDS,
               on_lost: Callable[[int, str], None] | None = None):
    self.client, self.pid, self.n = client, process_id, num_processes
    self.output, self.beat, self.lost_after = output, beat, lost_after
    self.on_lost = on_lost or self._exit
    self.others = [p for p in range(num_processes) if p != process_id]
    now = time.monotonic()
    self.seen = {p: now for p in self.others}  # when each peer's counter last moved
    self.values: dict[int, str] = {}
    self.answered = now  # when the key-value store last answered
    self.lost: tuple[int, str] | None = None
    self._stop = threading.Event()
    self._found = threading.Event()

  def start(self) -> PeerWatch:
    for target in (self._beat, self._check):
      threading.Thread(target=target, daemon=True, name=f"gptq_jax-{target.__name__}").start()
    return self

  def stop(self) -> None:
    self._stop.set()

  def _beat(self) -> None:
    count = 0
    while not self._stop.is_set():
      try:
        self.client.key_value_set(KEY.format(self.pid), str(count), allow_overwrite=True)
        count += 1
        for p in self.others:
          try:
            value = self.client.key_value_try_get(KEY.format(p))
          except Exception:  # noqa: BLE001 (not written yet)
            continue
          if value != self.values.get(p):
            self.values[p], self.seen[p] = value, time.monotonic()
        self.answered = time.monotonic()
      except Exception:  # noqa: BLE001 (the store is gone with the coordinator: _check decides)
        pass
      self._stop.wait(self.beat)

  def _verdict(self) -> tuple[int, str] | None:
    now = time.monotonic()
    if now - self.answered > self.lost_after and self.pid != 0:  # the coordinator holds the store
      return 0, f"the coordinator did not answer for {now - self.answered:.0f} s"
    late = [(now - t, p) for p, t in self.seen.items() if now - t > self.lost_after]
    return (max(late)[1], f"no sign of it for {max(late)[0]:.0f} s") if late else None

  def _check(self) -> None:
    while not self._stop.wait(self.beat / 2):
      verdict = self._verdict()
      if verdict is not None:
        self.lost = verdict
        self.on_lost(*verdict)  # the default ends the process here, with its line
        self._found.set()
        return

  def explain(self, timeout: float | None = None) -> tuple[int, str] | None:
    """Wait (at most ``timeout``, default ``lost_after`` and ``SLACK_SECONDS``) for the verdict
    on a lost peer; -> ``(process, why)`` or None when every peer is alive."""
    self._found.wait(self.lost_after + SLACK_SECONDS if timeout is None else timeout)
    return self.lost

  def _exit(self, process: int, why: str) -> None:
    print(lost_message(process, self.n, why, self.output), file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)

  def on_abort(self) -> bool:
    """Called when ``jax.distributed`` aborts the process (it does at once when the coordinator's
    connection drops): wait for the watchdog's verdict (the store stops answering, or a peer's
    counter stops), which prints the line and ends the process; -> False when every peer is
    alive (let the abort go on)."""
    return self.explain() is not None  # the watchdog thread prints the line and exits


_WATCH: PeerWatch | None = None


def lost_after_seconds() -> float:
  """``$GPTQ_JAX_LOST_AFTER_SECONDS`` when set (a number of seconds of at least three beats),
  else ``LOST_AFTER_SECONDS``; anything else is a ValueError naming the variable."""
  raw = os.environ.get(LOST_AFTER_ENV, "").strip()
  if not raw:
    return LOST_AFTER_SECONDS
  try:
    value = float(raw)
  except ValueError:
    value = float("nan")
  if not value >= 3 * BEAT_SECONDS:  # NaN included
    raise ValueError(f"{LOST_AFTER_ENV}={raw!r}: expected a number of seconds >= "
                     f"{3 * BEAT_SECONDS:g} (a peer is lost after that long without a heartbeat; "
                     f"default {LOST_AFTER_SECONDS:g})")
  return value


def watch(process_id: int, num_processes: int, output: str | None) -> PeerWatch | None:
  """Start the watchdog of this process (once), through ``jax.distributed``'s client, and catch
  the runtime's abort (``_catch_abort``)."""
  global _WATCH
  from jax._src import distributed  # noqa: PLC0415 (the runtime client has no public handle)

  client = getattr(distributed.global_state, "client", None)
  if _WATCH is None and client is not None and num_processes > 1:
    _WATCH = PeerWatch(client, process_id, num_processes, output=output,
                       lost_after=lost_after_seconds()).start()
    _catch_abort(_WATCH)
  return _WATCH


_ABORT_HANDLER = None  # kept alive: libc holds a pointer to it


def _catch_abort(w: PeerWatch) -> None:
  """When the coordinator dies, ``jax.distributed``'s error poller ends every other process at
  once with a fatal log and ``abort()``: no Python code runs. A C-level SIGABRT handler (a ctypes
  callback, installed with libc's ``signal``) gives the watchdog its say first: one line naming
  the lost process, exit code ``EXIT_CODE``. Any other abort goes on as before."""
  global _ABORT_HANDLER
  import ctypes  # noqa: PLC0415
  import signal  # noqa: PLC0415

  try:
    libc = ctypes.CDLL(None)
  except OSError:
    return
  handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)

  def handler(signum: int) -> None:
    if not w.on_abort():
      libc.signal(signum, ctypes.c_void_p(0))  # SIG_DFL: abort for real
      os.abort()

  _ABORT_HANDLER = handler_type(handler)
  libc.signal.restype = ctypes.c_void_p
  libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
  libc.signal(signal.SIGABRT, ctypes.cast(_ABORT_HANDLER, ctypes.c_void_p))


def first_a_lost_peer() -> None:
  """Called on an error in the main thread: under ``jax.distributed`` it may be a peer's death
  seen from inside a collective, so let the watchdog name it first (it ends the process with its
  own line); without a lost peer, return (after ``LOST_AFTER_SECONDS + SLACK_SECONDS``)."""
  if _WATCH is not None:
    _WATCH.explain()
