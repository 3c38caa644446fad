"""Files written whole (`infra/files.py`): a second write replaces the first, and no partial
file is left beside it."""

from md_jax.infra import files


def test_a_second_write_replaces_the_first_and_leaves_no_partial_file(tmp_path):
  path = tmp_path / "sub" / "lora.safetensors"
  files.write_whole(path, b"first")
  files.write_whole(path, b"second, longer")  # a run continued to more steps exports again
  assert path.read_bytes() == b"second, longer"
  files.write_whole(path, "text")
  assert path.read_text() == "text"
  assert sorted(p.name for p in path.parent.iterdir()) == ["lora.safetensors"]
