"""Compiler figures kept across processes (gptq_jax/plan/measure.py), on the CPU devices of the
main venv: a recorded program is read back without compiling; a strict file that lacks a program
refuses it in one line naming the program, and the versions when they differ."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from gptq_jax.plan import measure

S = jax.ShapeDtypeStruct


@jax.jit
def _prog(x):
  return jnp.tanh(x @ x.T).sum(axis=0)


def _args(n: int):
  return (S((n, 16), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),)


@pytest.fixture
def recorded(tmp_path):
  path = str(tmp_path / "figures.json")
  measure.use_figures_file(path)
  first = measure.measure("prog", "test", _prog, _args(8))
  yield path, first
  measure.use_figures_file(None)


def test_recorded_figures_are_read_back_without_compiling(recorded, monkeypatch):
  path, first = recorded
  table = json.load(open(path))
  assert table[measure.META] == measure._versions() and len(table) == 2
  measure.use_figures_file(path, strict=True)

  def no_compile(self, *a, **k):
    raise AssertionError("compiled although the figures are recorded")

  monkeypatch.setattr(jax.stages.Lowered, "compile", no_compile)
  again = measure.measure("prog", "test", _prog, _args(8))
  assert again == first and again.flops > 0
  assert set(measure.figures_used()) == set(table)


def test_a_changed_program_is_refused_in_one_line(recorded):
  path, _ = recorded
  measure.use_figures_file(path, strict=True)
  with pytest.raises(measure.FiguresMissing) as e:
    measure.measure("prog at 12 rows", "test", _prog, _args(12))  # another shape: another module
  msg = str(e.value)
  assert "\n" not in msg and "'prog at 12 rows'" in msg and path in msg
  assert "changed since" in msg


def test_other_versions_are_named(recorded, monkeypatch):
  path, _ = recorded
  monkeypatch.setattr(measure, "_versions", lambda: "jax 9.9 libtpu 9.9")
  measure.use_figures_file(path, strict=True)
  with pytest.raises(measure.FiguresMissing, match=r"recorded with jax .* and this is jax 9\.9"):
    measure.measure("prog", "test", _prog, _args(8))


def test_a_strict_file_must_exist(tmp_path):
  with pytest.raises(measure.FiguresMissing, match="does not exist"):
    measure.use_figures_file(str(tmp_path / "none.json"), strict=True)
  measure.use_figures_file(None)
