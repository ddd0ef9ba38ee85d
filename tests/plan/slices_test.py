"""Slice names and hosts (gptq_jax/plan/slices.py), and scripts/plan.py's first checks, in the main
venv (no libtpu: the compiling itself is tested in tests/tpu)."""

from __future__ import annotations

import pytest

from gptq_jax.cli import plan as cli_plan
from gptq_jax.plan import slices
from gptq_jax.plan.chips import CHIPS


@pytest.mark.parametrize("name,gen,dims", [
    ("v5e:2x4", "v5e", (2, 4)), ("v6e:2x2", "v6e", (2, 2)), ("v5p:2x2x1", "v5p", (2, 2, 1)),
    ("v5e-8", "v5e", (2, 4)), ("v6e-8", "v6e", (2, 4)),
    ("v5p-8", "v5p", (2, 2, 1)), ("v4-8", "v4", (2, 2, 1)),  # v4 / v5p count TensorCores
])
def test_topology_names(name, gen, dims):
  assert slices.parse(name) == (gen, dims)


@pytest.mark.parametrize("bad", ["v7:2x2", "v5e", "v5e-3", "tpu"])
def test_bad_topology_names_say_what_is_allowed(bad):
  with pytest.raises(ValueError, match="expected a slice like v5e:2x4"):
    slices.parse(bad)


def test_hosts_tile_the_slice():
  assert slices._host_bounds((2, 4), 8) == (2, 4, 1)
  assert slices._host_bounds((2, 4), 4) == (2, 2, 1)
  assert slices._host_bounds((2, 2, 2), 4) == (2, 2, 1)
  assert slices._host_bounds((2, 2), 8) is None


def test_the_roofline_is_the_slower_of_compute_and_memory():
  chip = CHIPS["v5e"]
  assert chip.roofline_seconds(197e12, 0) == pytest.approx(1.0)
  assert chip.roofline_seconds(1.0, 819e9) == pytest.approx(1.0)


def test_plan_without_libtpu_names_the_venv(tmp_path, capsys):
  (tmp_path / "config.json").write_text(
      '{"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, '
      '"num_hidden_layers": 2, "num_attention_heads": 4}')
  assert cli_plan.main(["--model", str(tmp_path), "--topology", "v5e:2x2"]) == 2
  assert ".venv-tpu/bin/python" in capsys.readouterr().err
  assert cli_plan.main(["--model", str(tmp_path / "nope"), "--topology", "v5e:2x2"]) == 2
  assert "expected an HF folder with a config.json" in capsys.readouterr().err
  assert cli_plan.main(["--model", str(tmp_path), "--topology", "v5e:2x2", "--nsamples", "0"]) == 2
  assert "nsamples=0 is not allowed" in capsys.readouterr().err
