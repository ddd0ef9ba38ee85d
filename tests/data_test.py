"""Calibration data: every source gives the requested shapes, deterministically, following
Optimum's recipes; named sets fail with a clear message when the hub is unreachable."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gptq_jax import data


class ByteTokenizer:
  """A stand-in tokenizer: one token per UTF-8 byte (+1), BOS = 0 prepended, pad = 0."""

  pad_token_id = 0
  eos_token_id = 0

  def __call__(self, text: str, **kwargs):
    return {"input_ids": [0] + [b + 1 for b in text.encode()]}


TOK = ByteTokenizer()


def test_sotu_splits():
  calib, evals = data.sotu_files("calib"), data.sotu_files("eval")
  assert len(calib) == 26 and len(evals) == 6 and len(data.sotu_files("all")) == 32
  assert calib[0].endswith("1990_george_bush_r.txt") and evals[0].endswith("2016_barack_obama_d.txt")
  text = data.sotu_texts("eval")
  assert text.startswith(open(evals[0]).read().strip()[:100]) and "\n\n" in text
  assert data.sotu_texts("all").startswith(data.sotu_texts("calib"))
  with pytest.raises(ValueError, match="split"):
    data.sotu_files("test")


def test_text_file_windows_follow_optimum_recipe(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text(data.sotu_texts("eval")[:5000])
  batches = data.get_calib_batches(str(path), TOK, nsamples=6, seqlen=64, seed=3, batch_size=2)
  assert len(batches) == 3
  tokens = data.tokenize_text(path.read_text().strip(), TOK)
  rng = random.Random(3)  # Optimum: random.seed(seed); randint(0, n - seqlen - 1) per sample
  starts = [rng.randint(0, len(tokens) - 64 - 1) for _ in range(6)]
  rows = np.concatenate([b["input_ids"] for b in batches])
  for row, start in zip(rows, starts):
    np.testing.assert_array_equal(row, tokens[start:start + 64])
  for b in batches:
    assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (2, 64)
    assert b["attention_mask"].dtype == np.int32 and b["attention_mask"].all()


def test_deterministic_and_seeded(tmp_path):
  (tmp_path / "t").mkdir()
  for i in range(3):
    (tmp_path / "t" / f"{i}.txt").write_text(f"Document {i}. " * 100)
  get = lambda seed: data.get_calib_batches(str(tmp_path / "t"), TOK, nsamples=4, seqlen=32,  # noqa: E731
                                            seed=seed)
  a, b, c = get(0), get(0), get(1)
  assert len(a) == 4 and a[0]["input_ids"].shape == (1, 32)
  assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))
  assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, c))


def test_folder_joins_files_in_name_order(tmp_path):
  (tmp_path / "b.txt").write_text("second")
  (tmp_path / "a.txt").write_text("first")
  assert data.read_text(tmp_path) == "first\n\nsecond"
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .txt files"):
    data.read_text(tmp_path / "empty")


def test_list_of_strings_is_left_padded(tmp_path):
  texts = ["short", "a bit longer text", "mid size"]
  batches = data.get_calib_batches(texts, TOK, seqlen=8, batch_size=2)
  assert [b["input_ids"].shape for b in batches] == [(2, 18), (1, 9)]
  ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
  np.testing.assert_array_equal(ids[0, -6:], TOK("short")["input_ids"])
  np.testing.assert_array_equal(mask[0], [0] * 12 + [1] * 6)
  np.testing.assert_array_equal(ids[1], TOK("a bit longer text")["input_ids"])
  assert mask[1].all()
  assert data.get_calib_batches(tuple(texts), TOK)[2]["input_ids"].shape == (1, 9)
  with pytest.raises(ValueError, match="list of strings"):
    data.get_calib_batches(["ok", 3], TOK)


def test_token_arrays_used_as_is(tmp_path):
  arr = np.random.RandomState(0).randint(0, 1000, size=(5, 16))
  np.save(tmp_path / "ids.npy", arr)
  for source in (str(tmp_path / "ids.npy"), arr):
    batches = data.get_calib_batches(source, None, nsamples=128, seqlen=2048, batch_size=2)
    np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]), arr)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    assert all(b["attention_mask"].all() for b in batches)
  np.save(tmp_path / "bad.npy", arr.astype(np.float32))
  with pytest.raises(ValueError, match="int array"):
    data.get_calib_batches(str(tmp_path / "bad.npy"))
  with pytest.raises(ValueError, match="int array"):
    data.get_calib_batches(arr[0])


def test_bad_sources(tmp_path):
  with pytest.raises(ValueError, match="neither one of"):
    data.get_calib_batches("no_such_file.txt", TOK)
  with pytest.raises(ValueError, match="nsamples"):
    data.get_calib_batches("wikitext2", TOK, nsamples=0)
  (tmp_path / "s.txt").write_text("tiny")
  with pytest.raises(ValueError, match="at least 33"):
    data.get_calib_batches(str(tmp_path / "s.txt"), TOK, seqlen=32)


@pytest.mark.parametrize("name", data.NAMED_DATASETS)
def test_named_sets_offline_give_a_clear_message(name):
  with pytest.raises(RuntimeError, match="unreachable") as info:
    data.get_calib_batches(name, TOK, nsamples=2, seqlen=16)
  message = str(info.value)
  assert ".txt file" in message and ".npy" in message and "sotu" in message
  assert info.value.__cause__ is None and info.value.__suppress_context__  # no deep traceback


def test_unresolvable_hub_fails_fast(monkeypatch):
  monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

  def no_network(*args, **kwargs):
    raise OSError("Name or service not known")

  monkeypatch.setattr(data.socket, "create_connection", no_network)
  with pytest.raises(RuntimeError, match="unreachable.*Name or service not known"):
    data.get_calib_batches("c4", TOK)


def test_wikitext2_recipe_with_a_local_dataset(monkeypatch):
  rows = ["", " = Title = \n"] + [f" Sentence number {i} . \n" for i in range(1200)]

  def fake_load(*args, **kwargs):
    assert args == ("wikitext", "wikitext-2-raw-v1") and kwargs["split"] == "train"
    return {"text": rows}

  monkeypatch.setattr(data, "_load_hub_dataset", lambda name, *a, **k: fake_load(*a, **k))
  batches = data.get_calib_batches("wikitext2", TOK, nsamples=3, seqlen=40, seed=0)
  text = "".join(" \n" if s == "" else s for s in rows[:1000])  # Optimum: first 1000 rows
  tokens = data.tokenize_text(text, TOK)
  rng = random.Random(0)
  for b in batches:
    start = rng.randint(0, len(tokens) - 41)
    np.testing.assert_array_equal(b["input_ids"][0], tokens[start:start + 40])


def test_c4_recipe_with_a_local_dataset(monkeypatch):
  docs = [{"text": "x" * n} for n in (5, 100, 7, 300, 50)]

  class FakeDataset(list):
    pass

  monkeypatch.setattr(data, "_load_hub_dataset", lambda name, *a, **k: FakeDataset(docs))
  batches = data.get_calib_batches("c4-new", TOK, nsamples=4, seqlen=60, seed=1)
  assert len(batches) == 4
  for b in batches:
    assert b["input_ids"].shape == (1, 60)
    assert set(b["input_ids"][0].tolist()) <= {0, ord("x") + 1}  # windows of long documents only
