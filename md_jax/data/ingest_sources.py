"""What `md_jax.data.ingest` reads: webdataset tars or a folder with a captions file, as examples.

Each input is cut into *tasks* (one per `.tar` shard, or one per `examples_per_shard` rows of a
captions file); a task yields `(key, image bytes | None, caption | None)` in a fixed order, and
`check_example` turns one into the stored image bytes or the reason it is skipped.
"""

import csv
import dataclasses
import io
import json
import os
import pathlib
import tarfile
from collections.abc import Iterator

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_FILES = ("metadata.jsonl", "metadata.csv")  # looked for in a folder without --captions

# Skip reasons, as counted in the report.
UNDECODABLE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
MISSING_IMAGE = "missing_image"
TOO_SMALL = "too_small"
EXTREME_ASPECT = "extreme_aspect"
DUPLICATE_KEY = "duplicate_key"
UNREADABLE_SHARD = "unreadable_shard"


@dataclasses.dataclass(frozen=True)
class Task:
  """One unit of work: a tar shard (`tar`) or rows of a captions file (`rows`)."""

  index: int
  name: str  # for the report: the tar's file name, or "captions[start:end]"
  tar: str | None = None
  rows: tuple[tuple[str, str, str], ...] = ()  # (key, image path, caption)


@dataclasses.dataclass(frozen=True)
class Filters:
  min_size: int = 0  # shorter side below this: skipped (0 = off)
  max_aspect: float = 0.0  # longer / shorter side above this: skipped (0 = off)
  resolution: int = 0  # shorter side resized down to this (0 = stored as it is)
  image_format: str = "jpeg"  # "jpeg" or "png": how stored images are encoded
  jpeg_quality: int = 95


def make_tasks(
  input_dir: str, captions: str, examples_per_shard: int
) -> tuple[list[Task], dict[str, list[str]]]:
  """The tasks of an input, and images already known to be unusable (reason → keys).

  A directory holding `.tar` files is webdataset input; otherwise it is a folder of images with
  a captions file (`captions`, or the folder's metadata.jsonl / metadata.csv).
  """
  root = pathlib.Path(input_dir)
  if not root.is_dir():
    raise ValueError(f"--input={input_dir}: no such directory")
  tars = sorted(p for p in root.rglob("*.tar") if p.is_file())
  if tars and not captions:
    return [Task(i, str(p.relative_to(root)), tar=str(p)) for i, p in enumerate(tars)], {}
  if not captions:
    found = [root / name for name in CAPTION_FILES if (root / name).is_file()]
    if not found:
      raise ValueError(
        f"--input={input_dir}: no .tar shards, and no --captions file (nor "
        f"{' / '.join(CAPTION_FILES)} in the folder)"
      )
    captions = str(found[0])
  rows = read_captions(captions, root)
  listed = {key for key, _, _ in rows}
  on_disk = sorted(
    str(p.relative_to(root))
    for p in root.rglob("*")
    if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS
  )
  unlisted = {MISSING_CAPTION: [key for key in on_disk if key not in listed]}
  tasks = [
    Task(
      i,
      f"captions[{start}:{start + examples_per_shard}]",
      rows=tuple(rows[start : start + examples_per_shard]),
    )
    for i, start in enumerate(range(0, len(rows), examples_per_shard))
  ]
  return tasks, unlisted


def read_captions(path: str, root: pathlib.Path) -> list[tuple[str, str, str]]:
  """(key, image path, caption) rows of a CSV (with a header) or JSONL captions file, in file
  order. Columns: `file_name` (relative to the folder) and `caption` (or `text`)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f"--captions={path}: no such file")
  text = file.read_text(encoding="utf-8")
  if file.suffix.lower() == ".jsonl":
    try:
      records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
      raise ValueError(f"--captions={path}: not JSON lines ({e})") from None
  elif file.suffix.lower() == ".csv":
    records = list(csv.DictReader(io.StringIO(text)))
  else:
    raise ValueError(f"--captions={path}: expected a .csv or .jsonl file")
  if records and (not isinstance(records[0], dict) or "file_name" not in records[0]):
    raise ValueError(f"--captions={path}: each row needs a 'file_name' and a 'caption' field")
  rows = []
  for record in records:
    record = record if isinstance(record, dict) else {}
    name = str(record.get("file_name") or "")
    caption = record.get("caption", record.get("text"))
    rows.append((name, str(root / name), caption if isinstance(caption, str) else ""))
  return rows


def task_examples(task: Task) -> Iterator[tuple[str | None, bytes | None, str | None]]:
  """The examples of a task, in order. A tar that ends early (truncated, corrupt) yields what it
  could read, then `(None, None, None)`."""
  if task.tar is None:
    for key, path, caption in task.rows:
      try:
        data = pathlib.Path(path).read_bytes()
      except OSError:
        data = None
      yield key, data, caption
    return
  yield from _tar_examples(task.tar)


def _tar_examples(path: str):
  """Groups a webdataset tar's members by key (the name up to the first dot of its base name),
  as webdataset writes them: consecutively. Read as a stream: a shard is never all in memory."""
  key, files = None, {}
  try:
    with tarfile.open(path, mode="r|") as tar:
      for member in tar:
        if not member.isfile():
          continue
        directory, base = os.path.split(member.name)
        stem, _, extension = base.partition(".")
        member_key = os.path.join(directory, stem)
        if member_key != key:
          if key is not None:
            yield (key, *_image_and_caption(files))
          key, files = member_key, {}
        files[extension.lower()] = tar.extractfile(member).read()  # short data: ReadError
      # A tar cut at a header ends the loop quietly: a whole one ends with two zero blocks.
      if os.path.getsize(path) < tar.offset + 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"{path} is truncated")
  except (tarfile.TarError, OSError, EOFError):
    if key is not None:
      yield (key, *_image_and_caption(files))
    yield None, None, None
    return
  if key is not None:
    yield (key, *_image_and_caption(files))


def _image_and_caption(files: dict[str, bytes]) -> tuple[bytes | None, str | None]:
  image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
  caption = None
  if "txt" in files:
    caption = files["txt"].decode("utf-8", errors="replace")
  elif "json" in files:
    try:
      caption = json.loads(files["json"]).get("caption")
    except (ValueError, AttributeError):
      caption = None
  return image, caption if isinstance(caption, str) else None


def check_example(image: bytes | None, caption: str | None, filters: Filters):
  """(stored image bytes, caption, None) for a usable example, else (None, None, skip reason).

  The image is decoded (which catches corrupt files), converted to RGB, filtered, resized down
  if asked, and re-encoded unless its bytes are already what would be stored.
  """
  if image is None:
    return None, None, MISSING_IMAGE
  caption = (caption or "").strip()
  if not caption:
    return None, None, MISSING_CAPTION
  try:
    with Image.open(io.BytesIO(image)) as decoded:
      source_format, source_mode = decoded.format, decoded.mode
      rgb = decoded.convert("RGB")  # forces the decode: a corrupt file fails here
  except Exception:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
    return None, None, UNDECODABLE
  width, height = rgb.size
  short, long = min(width, height), max(width, height)
  if short < max(filters.min_size, 1):
    return None, None, TOO_SMALL
  if filters.max_aspect and long / short > filters.max_aspect:
    return None, None, EXTREME_ASPECT
  target = filters.image_format.upper()
  if filters.resolution and short > filters.resolution:
    scale = filters.resolution / short
    size = (
      max(filters.resolution, round(width * scale)),
      max(filters.resolution, round(height * scale)),
    )
    rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
  elif source_format == target and source_mode == "RGB":
    return image, caption, None
  out = io.BytesIO()
  if target == "JPEG":
    rgb.save(out, format="JPEG", quality=filters.jpeg_quality)
  else:
    rgb.save(out, format="PNG")
  return out.getvalue(), caption, None
