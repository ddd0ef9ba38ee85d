"""The lost-process bound's setting (cli/peers.py): ``$GPTQ_JAX_LOST_AFTER_SECONDS`` or 20 s; a bad
value is one ValueError naming the variable and what it accepts, raised before the processes
meet (the launch itself is tests/cli/multihost_test.py)."""

import pytest

from gptq_jax.cli import peers
from gptq_jax.cli.quantize import main


def test_default_and_setting(monkeypatch):
  monkeypatch.delenv(peers.LOST_AFTER_ENV, raising=False)
  assert peers.lost_after_seconds() == peers.LOST_AFTER_SECONDS == 20.0
  monkeypatch.setenv(peers.LOST_AFTER_ENV, " 7.5 ")
  assert peers.lost_after_seconds() == 7.5


@pytest.mark.parametrize("raw", ["soon", "nan", "0", "2"])
def test_bad_setting_is_refused_before_the_processes_meet(monkeypatch, capsys, tmp_path, raw):
  monkeypatch.setenv(peers.LOST_AFTER_ENV, raw)
  with pytest.raises(ValueError, match=f"GPTQ_JAX_LOST_AFTER_SECONDS='{raw}': expected a number "
                                       r"of seconds >= 3"):
    peers.lost_after_seconds()
  # two processes that would meet at a coordinator nobody runs: the line comes first
  rc = main(["--model", "smollm2-135m", "--output", str(tmp_path / "q"), "--coordinator",
             "127.0.0.1:1",
             "--num-processes", "2", "--process-id", "1"])
  err = capsys.readouterr().err
  assert rc == 2 and err.count("\n") == 1 and peers.LOST_AFTER_ENV in err, err
