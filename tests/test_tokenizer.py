"""The CLIP tokenizer and the shipped CLIP-format vocabulary for `shapes`."""

import json

import numpy as np
import pytest

from md_jax.data import shapes_scene
from md_jax.data import tokenizer as tok


def test_shipped_vocabulary_loads_as_clip_and_covers_the_captions():
  tokenizer = tok.load_tokenizer()
  vocab = json.loads((tok.SHAPES_TOKENIZER_DIR / "vocab.json").read_text())
  assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
  rng = np.random.default_rng(99)
  captions = [shapes_scene.sample_scene(rng).caption for _ in range(200)]
  ids = tok.tokenize(tokenizer, captions)
  assert ids.shape == (200, 77) and ids.dtype == np.int32
  assert (ids[:, 0] == tokenizer.bos_token_id).all()
  for caption, row in zip(captions, ids):
    n = int(np.argmax(row == tokenizer.eos_token_id))
    # Every word of the grammar is known: no byte-level fallback, one token per word.
    assert n - 1 == len(caption.split())
    assert (row[n:] == tokenizer.pad_token_id).all()
    assert tokenizer.decode(row, skip_special_tokens=True) == caption


def test_long_prompts_are_truncated_to_77_ending_in_eos():
  tokenizer = tok.load_tokenizer()
  ids = tok.tokenize(tokenizer, ["red " * 200])
  assert ids.shape == (1, 77) and ids[0, -1] == tokenizer.eos_token_id


def test_rebuilding_the_vocabulary_reproduces_the_shipped_files(tmp_path):
  tok.build_clip_vocabulary(tok.shapes_training_captions(), tmp_path)
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    assert (tmp_path / name).read_text() == (tok.SHAPES_TOKENIZER_DIR / name).read_text(), name


def test_missing_tokenizer_file_is_named(tmp_path):
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="merges.txt"):
    tok.load_tokenizer(tmp_path)
