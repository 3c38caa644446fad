"""`md_jax.data.ingest`: users' webdataset tars or image folders → a TFDS dataset read by name."""

import io
import json
import pathlib
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image, ImageDraw

from configs import data as data_config
from md_jax.data import ingest, tokenizer
from md_jax.data.ingest_sources import Filters
from md_jax.data.pipeline import create_input_iterator
from md_jax.data.prepare import prepare_dataset
from md_jax.infra import sharding

RULES = sharding.DEFAULT_LOGICAL_AXIS_RULES
FILTERS = Filters(min_size=16, max_aspect=3.0)


def _image(seed: int, size=(48, 40), fmt="JPEG") -> bytes:
  rng = np.random.default_rng(seed)
  image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
  draw = ImageDraw.Draw(image)
  x, y = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
  draw.rectangle((x, y, x + size[0] // 3, y + size[1] // 3), fill=(255, 0, 0))
  out = io.BytesIO()
  image.save(out, format=fmt)
  return out.getvalue()


def _write_tar(path: pathlib.Path, members: list[tuple[str, bytes]]) -> None:
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _caption(shard: int, i: int) -> str:
  return f"a red square on colour {shard}-{i}"


def _json(caption: str) -> bytes:
  return json.dumps({"caption": caption, "url": "http://example.com", "status": "success"}).encode()


def _make_tars(root: pathlib.Path) -> set[str]:
  """Three img2dataset-style shards: 14 good examples (jpg/png/webp, txt or json captions), a
  corrupt jpg, an image without caption, an 8×8 image, a 100×20 one and a caption alone."""
  root.mkdir(parents=True, exist_ok=True)
  good = set()
  members = []
  for i in range(6):
    key, fmt, ext = f"0000{i:05d}", ("JPEG", "PNG", "WEBP")[i % 3], ("jpg", "png", "webp")[i % 3]
    members.append((f"{key}.{ext}", _image(i, fmt=fmt)))
    caption = _caption(0, i)
    members.append((f"{key}.txt", caption.encode()) if i % 2 else (f"{key}.json", _json(caption)))
    good.add(caption)
  _write_tar(root / "00000.tar", members)

  members = [
    ("0001bad01.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg at all"),
    ("0001bad01.txt", b"a corrupt image"),
    ("0001bad02.jpg", _image(100)),  # no caption
    ("0001bad03.png", _image(101, size=(8, 8), fmt="PNG")),
    ("0001bad03.txt", b"a tiny image"),
    ("0001bad04.jpg", _image(102, size=(100, 20))),
    ("0001bad04.txt", b"a wide image"),
  ]
  for i in range(4):
    members += [(f"0001{i:05d}.jpg", _image(10 + i)), (f"0001{i:05d}.txt", _caption(1, i).encode())]
    good.add(_caption(1, i))
  _write_tar(root / "00001.tar", members)

  members = [("0002bad05.json", _json("a caption without its image"))]
  for i in range(4):
    members += [(f"0002{i:05d}.jpg", _image(20 + i)), (f"0002{i:05d}.json", _json(_caption(2, i)))]
    good.add(_caption(2, i))
  _write_tar(root / "00002.tar", members)
  return good


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
  root = tmp_path_factory.mktemp("tars")
  return root, _make_tars(root)


@pytest.fixture(scope="module")
def ingested(tars, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  report = ingest.ingest(
    str(tars[0]), "my_images", str(data_dir), workers=2, validation_fraction=0.25, filters=FILTERS
  )
  return str(data_dir), report


def test_bad_examples_are_skipped_and_counted(ingested):
  data_dir, report = ingested
  assert report["skipped"] == {
    "extreme_aspect": 1,
    "missing_caption": 1,
    "missing_image": 1,
    "too_small": 1,
    "undecodable_image": 1,
  }
  assert report["skipped_examples"]["undecodable_image"] == ["00001.tar/0001bad01"]
  assert report["examples_read"] == 19
  assert report["written"]["train"] + report["written"]["validation"] == 14
  assert report["written"]["train"] and report["written"]["validation"]
  on_disk = pathlib.Path(data_dir, "my_images", "1.0.0", ingest.REPORT_NAME).read_text()
  assert json.loads(on_disk) == report


def test_every_kept_caption_round_trips_through_the_data_source(ingested, tars):
  data_dir, report = ingested
  builder = prepare_dataset("my_images", data_dir)  # what the trainer calls
  assert set(builder.info.splits) == {"train", "validation"}
  assert builder.info.splits["train"].num_examples == report["written"]["train"]
  captions = []
  for split in ("train", "validation"):
    source = builder.as_data_source(split)
    for i in range(len(source)):
      example = source[i]
      assert example["image"].ndim == 3 and example["image"].shape[-1] == 3
      captions.append(example["caption"].decode())
      assert ingest.in_validation(example["key"].decode(), 0.25) == (split == "validation")
  assert sorted(captions) == sorted(tars[1])


def test_the_input_pipeline_reads_it_by_name(ingested):
  data_dir, _ = ingested
  config = data_config.get_config("tiny").data
  config.dataset, config.data_dir = "my_images", data_dir
  mesh = sharding.create_mesh((8, 1))
  it = create_input_iterator(config, global_batch_size=8, mesh=mesh, rules=RULES, train=False)
  batch = jax.device_get(next(it))
  it.close()
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  source = prepare_dataset("my_images", data_dir).as_data_source("train")
  expected = [source[i]["caption"].decode() for i in range(8)]  # train=False reads in order
  vocab = tokenizer.load_tokenizer(None)
  np.testing.assert_array_equal(batch["tokens"], tokenizer.tokenize(vocab, expected))


def _files(directory: pathlib.Path) -> dict[str, bytes]:
  return {
    p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != ingest.REPORT_NAME
  }


def test_one_worker_writes_what_two_write(ingested, tars, tmp_path):
  data_dir, report = ingested
  again = ingest.ingest(
    str(tars[0]), "my_images", str(tmp_path), workers=1, validation_fraction=0.25, filters=FILTERS
  )
  assert {k: v for k, v in again.items() if k != "data_dir"} == {
    k: v for k, v in report.items() if k != "data_dir"
  }
  one, two = (pathlib.Path(d, "my_images", "1.0.0") for d in (tmp_path, data_dir))
  assert _files(one) == _files(two)
  assert any(name.startswith("my_images-train.array_record-") for name in _files(one))


def test_truncated_shard_keeps_what_it_could_read(tars, tmp_path):
  root = tmp_path / "input"
  root.mkdir()
  whole = (tars[0] / "00000.tar").read_bytes()
  (root / "00000.tar").write_bytes(whole[: len(whole) // 2])
  report = ingest.ingest(str(root), "cut", str(tmp_path / "tfds"), filters=FILTERS)
  assert report["skipped"]["unreadable_shard"] == 1
  assert report["skipped_examples"]["unreadable_shard"] == ["00000.tar"]
  assert 0 < report["written"]["train"] < 6


def test_folder_with_a_captions_file(tmp_path):
  root = tmp_path / "photos"
  (root / "sub").mkdir(parents=True)
  (root / "a.jpg").write_bytes(_image(1))
  (root / "sub" / "b.png").write_bytes(_image(2, fmt="PNG"))
  (root / "c.jpg").write_bytes(_image(3))  # its caption is empty
  (root / "unlisted.jpg").write_bytes(_image(4))
  rows = [
    ("a.jpg", "first"),
    ("sub/b.png", "second, with a comma"),
    ("c.jpg", ""),
    ("gone.jpg", "x"),
  ]
  lines = ["file_name,caption"] + [f'{name},"{caption}"' for name, caption in rows]
  (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
  report = ingest.ingest(
    str(root), "photos", str(tmp_path / "tfds"), captions=str(tmp_path / "captions.csv")
  )
  assert report["written"] == {"train": 2, "validation": 0}
  assert report["skipped"] == {"missing_caption": 2, "missing_image": 1}
  source = prepare_dataset("photos", str(tmp_path / "tfds")).as_data_source("train")
  assert [source[i]["caption"].decode() for i in range(2)] == ["first", "second, with a comma"]
  assert [source[i]["key"].decode() for i in range(2)] == ["a.jpg", "sub/b.png"]

  # The same folder with a metadata.jsonl (Hugging Face's imagefolder layout), found by itself.
  jsonl = [json.dumps({"file_name": n, "caption": c}) for n, c in rows]
  (root / "metadata.jsonl").write_text("\n".join(jsonl) + "\n")
  again = ingest.ingest(str(root), "photos", str(tmp_path / "tfds"), overwrite=True)
  assert again["written"] == report["written"] and again["skipped"] == report["skipped"]


def test_existing_dataset_is_kept_without_overwrite(ingested, tars):
  data_dir, _ = ingested
  with pytest.raises(ValueError, match="--data_dir=.*exists"):
    ingest.ingest(str(tars[0]), "my_images", data_dir)


def test_bad_input_path_is_one_line_naming_the_flag(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "md_jax.data.ingest",
      f"--input={tmp_path}/nowhere",
      "--name=x",
      f"--data_dir={tmp_path}/tfds",
    ],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 1
  assert (
    result.stderr.strip().splitlines()[-1] == f"FATAL --input={tmp_path}/nowhere: no such directory"
  )


def test_registered_tfds_name_is_refused(tars, tmp_path):
  with pytest.raises(ValueError, match="--name=mnist: a TFDS dataset of that name exists"):
    ingest.ingest(str(tars[0]), "mnist", str(tmp_path))
