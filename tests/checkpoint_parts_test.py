"""A checkpoint written a part at a time (checkpoint_parts.py) reads back as the tree one save
writes; a part that is missing, damaged or another run's is named on load."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from gptq_jax import checkpoint
from gptq_jax.checkpoint_parts import PartsWriter
from gptq_jax.core.weights import PackedWeight
from gptq_jax.integrity import DamagedFileError
from gptq_jax.models import LlamaConfig


def _packed(rng, k=32, n=16):
  return PackedWeight(qweight=rng.integers(-2**31, 2**31 - 1, (k // 8, n), dtype=np.int32),
                      qzeros=rng.integers(-2**31, 2**31 - 1, (1, n // 8), dtype=np.int32),
                      scales=rng.random((1, n), dtype=np.float32),
                      g_idx=np.zeros(k, np.int32), bits=4, group_size=32, format="gptq")


def _tree(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  block = lambda: {"mlp": {"down_proj": {"kernel": _packed(rng)}},  # noqa: E731
                   "input_layernorm": {"weight": rng.random(32, dtype=np.float32)}}
  return {"embed_tokens": {"embedding": rng.random((50, 32), dtype=np.float32)},
          "lm_head": {"kernel": rng.random((32, 50), dtype=np.float32)},
          "norm": {"weight": rng.random(32, dtype=np.float32)},
          "layers_0": block(), "layers_1": block()}


CFG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16)


def _write_parts(path: str, tree: dict, blocks_dir: str) -> None:
  for i in range(2):  # as the resume state saves each block
    checkpoint.write_tree(blocks_dir, i, tree[f"layers_{i}"], {"records": []})
  writer = PartsWriter(path)
  writer.add("embed_tokens", tree["embed_tokens"])
  kernel = tree["lm_head"]["kernel"]  # in pieces of 20, 20 and 10 columns (add_pieces)
  writer.add_pieces("lm_head", "kernel", 1, (kernel[:, lo:lo + 20] for lo in range(0, 50, 20)))
  writer.link_blocks(blocks_dir, {"layers_0": 0, "layers_1": 1})
  writer.finish({"norm": tree["norm"]}, {"model_config": CFG.to_hf_dict(), "quant_config": None})


def _leaves(tree) -> dict:
  out = {}

  def visit(prefix, node):
    if isinstance(node, PackedWeight):
      node = {f: getattr(node, f) for f in ("qweight", "qzeros", "scales", "g_idx")}
    if isinstance(node, dict):
      for k, v in node.items():
        visit(f"{prefix}/{k}", v)
    else:
      out[prefix] = np.asarray(node)
  visit("", dict(tree))
  return out


@pytest.fixture
def written(tmp_path):
  tree = _tree(0)
  path = str(tmp_path / "ckpt")
  _write_parts(path, tree, str(tmp_path / "run.partial" / "blocks"))
  return tree, path


def test_parts_read_back_as_one_save(written, tmp_path):
  tree, path = written
  whole = str(tmp_path / "whole")
  checkpoint.save(whole, tree, model_config=CFG)
  a, b = checkpoint.load(path).params, checkpoint.load(whole).params
  assert isinstance(a["layers_1"]["mlp"]["down_proj"]["kernel"], PackedWeight)
  la, lb = _leaves(a), _leaves(b)
  assert sorted(la) == sorted(lb) == sorted(_leaves(tree))
  for k in la:
    np.testing.assert_array_equal(la[k], lb[k], err_msg=k)
    np.testing.assert_array_equal(la[k], _leaves(tree)[k], err_msg=k)
  assert sorted(os.listdir(path)) == ["blocks", "nonlayer", "orbax"]
  shutil.rmtree(tmp_path / "run.partial")  # linked, not moved: the checkpoint stands alone
  assert _leaves(checkpoint.load(path).params).keys() == la.keys()


def test_a_missing_or_foreign_part_is_named(written, tmp_path):
  _, path = written
  other = str(tmp_path / "other")
  _write_parts(other, _tree(1), str(tmp_path / "other.partial" / "blocks"))
  victim = os.path.join(path, "blocks", "1")
  shutil.copytree(victim, tmp_path / "block1")
  shutil.rmtree(victim)
  shutil.copytree(os.path.join(other, "blocks", "1"), victim)  # another run's block 1
  with pytest.raises(DamagedFileError, match="not the one this checkpoint was saved with") as e:
    checkpoint.load(path)
  assert e.value.path == victim
  shutil.rmtree(victim)
  with pytest.raises(DamagedFileError, match="missing checkpoint part"):
    checkpoint.load(path)
  shutil.copytree(tmp_path / "block1", victim)  # this run's own block 1 again
  piece = os.path.join(path, "nonlayer", "2")  # the head's second piece, from the other run
  shutil.rmtree(piece)
  shutil.copytree(os.path.join(other, "nonlayer", "2"), piece)
  with pytest.raises(DamagedFileError, match="not the one this checkpoint was saved with") as e:
    checkpoint.load(path)
  assert e.value.path == piece


def test_a_damaged_part_is_named(written):
  _, path = written
  step = os.path.join(path, "nonlayer", "0")
  files = [os.path.join(r, f) for r, _, fs in os.walk(step) for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  with pytest.raises(DamagedFileError, match="bytes changed") as e:
    checkpoint.load(path)
  assert e.value.path == victim
