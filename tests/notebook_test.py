"""notebooks/quickstart.ipynb (the README's "Quantizing a model" steps on SmolLM2-135M, at a
CI-affordable size) runs top to bottom in a kernel of this interpreter, and what it prints holds:
GPTQ beats round-to-nearest on held-out text, the reloaded checkpoint is the quantized result, and
the checkpoint generates.

This is also the suite's real-model check of the pipeline (4-bit g128 act-order GPTQ on 8 x 128
calibration tokens against RTN on 6 held-out windows of 256): it replaced
tests/pipeline/smollm2_test.py, which ran the same quantization and comparison in-process (the two
took 173 s each, measured one after the other; the former tiny-model notebook 99 s)."""

from __future__ import annotations

import os
import re

import pytest

from tests.interop.helpers import importorskip
from tests.xla_env import NO_OPT_ENV, one_device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch, tmp_path):
  nbformat = importorskip("nbformat")
  nbclient = importorskip("nbclient")
  monkeypatch.setenv("XLA_FLAGS", one_device_flags())  # the kernel sees one CPU device, as a user
  monkeypatch.setenv(NO_OPT_ENV, "0")  # a real model's run: XLA's optimizations on
  monkeypatch.chdir(tmp_path)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # "python" in the kernel spec is replaced by sys.executable: the kernel runs in this venv.
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  out = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
  ppl = {name: float(v) for name, v in re.findall(r"^(float|GPTQ 4-bit|RTN 4-bit)\s+perplexity "
                                                  r"([\d.]+)$", out, re.M)}
  assert set(ppl) == {"float", "GPTQ 4-bit", "RTN 4-bit"}, out
  # What the notebook demonstrates: GPTQ keeps SmolLM2 closer to float than round-to-nearest on
  # the same grid (measured 25.4 / 29.3 / 35.6), and stays within reach of the float model.
  assert ppl["float"] < ppl["GPTQ 4-bit"] < ppl["RTN 4-bit"], ppl
  assert ppl["GPTQ 4-bit"] < 1.35 * ppl["float"], ppl
  assert "identical arrays: True" in out and "PackedWeight" in out, out
  assert os.path.isdir(tmp_path / "out" / "smollm2-4bit-notebook" / "orbax")
  assert re.search(r"^'The state of the union is.{10,}'$", out, re.M | re.S), out
