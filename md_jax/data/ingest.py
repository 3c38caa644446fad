"""Turns captioned images as people have them into a TFDS dataset the input pipeline reads by name.

    python -m md_jax.data.ingest --input=/data/tars --name=my_images --data_dir=/data/tfds \
        --workers=16 --validation_fraction=0.01 --min_size=256 --max_aspect=2
    python -m md_jax.data.ingest --input=/data/photos --captions=/data/photos/captions.csv \
        --name=my_photos --data_dir=/data/tfds
    python -m md_jax.main --config=configs/data.py --config.data.dataset=my_images \
        --config.data.data_dir=/data/tfds --workdir=...

Input: a directory of webdataset `.tar` shards as img2dataset writes them (`KEY.jpg|png|webp`
with `KEY.txt`, or `KEY.json` holding a "caption"), or a folder of images with a captions file
(CSV with a header, or JSONL: `file_name`, `caption`; the folder's metadata.jsonl / metadata.csv
when --captions is not given). Output: `<data_dir>/<name>/1.0.0/`, ArrayRecord shards (one per
input shard, per split) with TFDS's dataset_info.json, features "image" (encoded bytes), "caption"
and "key", as `shapes` has them, so data configs work unchanged; `prepare_dataset` finds it on
disk. An example goes to "validation" when a hash of its key falls below --validation_fraction.

Corrupt or undecodable images, missing captions or images, images whose shorter side is below
--min_size, aspect ratios beyond --max_aspect, and repeated keys are skipped and counted in
`<dataset dir>/ingest_report.json`, with a few example keys per reason; a truncated tar keeps what
it could read. Input shards run in parallel processes (--workers); the output is the same, byte
for byte, whatever the number of workers. The directory appears complete or not at all (it is
written under a temporary name and renamed).

Beyond one machine, `md_jax.data.ingest_beam` runs the same tasks as an Apache Beam pipeline
(Dataflow, Flink, Spark) and writes the same directory, byte for byte.
"""

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import shutil

import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import example_serializer, naming

from md_jax.data import ingest_sources as sources

VERSION = "1.0.0"
REPORT_NAME = "ingest_report.json"
SPLITS = ("train", "validation")
EXAMPLE_KEYS_PER_REASON = 5


def features(image_format: str = "jpeg") -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
      "caption": tfds.features.Text(),
      "key": tfds.features.Text(),
    }
  )


def in_validation(key: str, fraction: float) -> bool:
  """A stable split: the same key lands in the same split on every machine and every run."""
  if fraction <= 0:
    return False
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclasses.dataclass
class TaskResult:
  index: int
  read: int = 0
  counts: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
  num_bytes: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
  skipped: dict = dataclasses.field(default_factory=dict)  # reason → count
  examples: dict = dataclasses.field(default_factory=dict)  # reason → a few keys

  def skip(self, reason: str, key: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1
    keys = self.examples.setdefault(reason, [])
    if len(keys) < EXAMPLE_KEYS_PER_REASON:
      keys.append(key)


class Serializer:
  """TFDS's example serializer, byte-deterministic: a tf.Example's features are a protobuf map,
  whose serialized order otherwise varies between processes (same records, other bytes)."""

  def __init__(self, feature_dict: tfds.features.FeaturesDict):
    self._features = feature_dict
    self._serializer = example_serializer.ExampleSerializer(feature_dict.get_serialized_info())

  def __call__(self, example: dict) -> bytes:
    proto = self._serializer.get_tf_example(self._features.encode_example(example))
    return proto.SerializeToString(deterministic=True)


def open_shard_writer(path: str):
  """An ArrayRecord writer with the options of TFDS's ArrayRecord adapter: group_size 1, so that
  `tfds.data_source` reads any record by index without decoding its neighbours."""
  return array_record_module.ArrayRecordWriter(str(path), "group_size:1")


def write_dataset_info(directory, name: str, feature_dict, split_infos, description: str,
                       supervised_keys=None) -> None:  # fmt: skip
  """TFDS's dataset_info.json and features.json for ArrayRecord shards named by TFDS's default
  template, so that `tfds.builder_from_directory(directory)` (and `prepare_dataset`, by name)
  reads them."""
  tfds.folder_dataset.write_metadata(
    data_dir=directory,
    features=feature_dict,
    split_infos=split_infos,
    version=VERSION,
    filename_template=naming.ShardedFileTemplate(
      data_dir=directory, dataset_name=name, filetype_suffix="array_record"
    ),
    check_data=False,
    description=description,
    supervised_keys=supervised_keys,
  )


def _shard_path(directory: str, index: int, split: str) -> str:
  return os.path.join(directory, f"task-{index:05d}-{split}.array_record")


def run_task(args) -> TaskResult:
  """Reads one task, writes its kept examples to one ArrayRecord file per split (under the
  temporary directory) in input order. Runs in a worker process, or a Beam worker: running it
  again (a retried bundle) rewrites the same files."""
  task, filters, validation_fraction, directory = args
  serialize = Serializer(features(filters.image_format))
  result = TaskResult(task.index)
  writers = {}
  seen = set()
  try:
    for key, image, caption in sources.task_examples(task):
      if key is None:  # the shard ended early (truncated, corrupt)
        result.skip(sources.UNREADABLE_SHARD, task.name)
        continue
      result.read += 1
      name = f"{task.name}/{key}" if task.tar else key
      if key in seen:
        result.skip(sources.DUPLICATE_KEY, name)
        continue
      seen.add(key)
      stored, caption, reason = sources.check_example(image, caption, filters)
      if reason:
        result.skip(reason, name)
        continue
      record = serialize({"image": stored, "caption": caption, "key": name})
      split = "validation" if in_validation(name, validation_fraction) else "train"
      if split not in writers:
        writers[split] = open_shard_writer(_shard_path(directory, task.index, split))
      writers[split].write(record)
      result.counts[split] += 1
      result.num_bytes[split] += len(record)
  finally:
    for writer in writers.values():
      writer.close()
  return result


def ingest(
  input_dir: str,
  name: str,
  data_dir: str,
  *,
  captions: str = "",
  workers: int = 1,
  validation_fraction: float = 0.0,
  examples_per_shard: int = 10_000,
  filters: sources.Filters | None = None,
  overwrite: bool = False,
) -> dict:
  """Writes dataset `name` under `data_dir` from `input_dir`; returns the report (also written
  to `<data_dir>/<name>/1.0.0/ingest_report.json`). Errors name the flag at fault."""
  filters = filters or sources.Filters()
  if workers < 1:
    raise ValueError(f"--workers={workers}: must be at least 1")
  plan = plan_ingest(
    input_dir, name, data_dir, captions, validation_fraction, examples_per_shard, filters, overwrite
  )
  if workers > 1 and len(plan.tasks) > 1:
    # Spawned, not forked: the parent may hold JAX's or TensorFlow's threads.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(plan.tasks))) as pool:
      results = list(pool.imap(run_task, plan.task_args(), chunksize=1))
  else:
    results = [run_task(a) for a in plan.task_args()]
  return finish(plan, results)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What an ingest does, decided before any image is read; the local pool and the Beam
  pipeline (`ingest_beam`) both run `run_task` over `task_args()` and end with `finish`."""

  input_dir: str
  name: str
  data_dir: str
  validation_fraction: float
  filters: sources.Filters
  tasks: tuple
  unlisted: dict
  temporary: str  # where tasks write; renamed to `final` when complete
  final: str

  def task_args(self) -> list[tuple]:
    return [(t, self.filters, self.validation_fraction, self.temporary) for t in self.tasks]


def plan_ingest(
  input_dir, name, data_dir, captions, validation_fraction, examples_per_shard, filters, overwrite
) -> Plan:
  """Checks the arguments, lists the input's tasks and makes an empty temporary directory."""
  _check_arguments(name, data_dir, validation_fraction, examples_per_shard, filters)
  final = pathlib.Path(data_dir) / name / VERSION
  if final.exists() and not overwrite:
    raise ValueError(f"--data_dir={data_dir}: {final} exists (--overwrite replaces it)")
  tasks, unlisted = sources.make_tasks(input_dir, captions, examples_per_shard)
  if not tasks:
    raise ValueError(f"--input={input_dir}: nothing to ingest (no tar shard, no captions row)")
  temporary = final.with_name(f"{VERSION}.incomplete")
  shutil.rmtree(temporary, ignore_errors=True)
  temporary.mkdir(parents=True)
  return Plan(
    input_dir, name, data_dir, validation_fraction, filters, tuple(tasks), unlisted,
    str(temporary), str(final),
  )  # fmt: skip


def finish(plan: Plan, results: list[TaskResult]) -> dict:
  """Names the tasks' files as TFDS shards (in task order, whatever order the results came in),
  writes dataset_info.json and the report, and renames the directory into place."""
  results = sorted(results, key=lambda r: r.index)
  temporary, final = pathlib.Path(plan.temporary), pathlib.Path(plan.final)
  report = _report(plan, results)
  if not report["written"]["train"]:
    shutil.rmtree(temporary, ignore_errors=True)
    raise ValueError(
      f"--input={plan.input_dir}: no usable example for the train split "
      f"(skipped: {report['skipped']})"
    )
  split_infos = []
  for split in SPLITS:
    kept = [r for r in results if r.counts[split]]
    if not kept:
      continue
    template = naming.ShardedFileTemplate(
      data_dir=temporary, dataset_name=plan.name, split=split, filetype_suffix="array_record"
    )
    for shard, result in enumerate(kept):
      target = template.sharded_filepath(shard_index=shard, num_shards=len(kept))
      os.replace(_shard_path(str(temporary), result.index, split), target)
    split_infos.append(
      tfds.core.SplitInfo(
        name=split,
        shard_lengths=[r.counts[split] for r in kept],
        num_bytes=sum(r.num_bytes[split] for r in kept),
        filename_template=template,
      )
    )
    report["shards"][split] = len(kept)
  write_dataset_info(
    temporary, plan.name, features(plan.filters.image_format), split_infos,
    description=f"Ingested by md_jax.data.ingest from {plan.input_dir}.",
    supervised_keys=("image", "caption"),
  )  # fmt: skip
  (temporary / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
  if final.exists():
    shutil.rmtree(final)
  os.replace(temporary, final)
  return report


def _check_arguments(name, data_dir, validation_fraction, examples_per_shard, filters):
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name or ""):
    raise ValueError(f"--name={name!r}: use a snake_case name (a-z, 0-9, _), as TFDS names are")
  if name in tfds.list_builders(with_community_datasets=False):
    raise ValueError(f"--name={name}: a TFDS dataset of that name exists; choose another name")
  if not data_dir:
    raise ValueError("--data_dir: required (the TFDS data directory the dataset goes into)")
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"--validation_fraction={validation_fraction}: must be in [0, 1)")
  if examples_per_shard < 1:
    raise ValueError(f"--examples_per_shard={examples_per_shard}: must be at least 1")
  if filters.image_format not in ("jpeg", "png"):
    raise ValueError(f"--image_format={filters.image_format}: use jpeg or png")
  if filters.max_aspect and filters.max_aspect < 1:
    raise ValueError(f"--max_aspect={filters.max_aspect}: must be ≥ 1 (or 0: no filter)")
  if filters.min_size < 0 or filters.resolution < 0:
    raise ValueError("--min_size and --resolution must be ≥ 0")


def _report(plan: Plan, results: list[TaskResult]) -> dict:
  skipped, examples = {}, {}
  for reason, keys in plan.unlisted.items():
    if keys:
      skipped[reason] = len(keys)
      examples[reason] = keys[:EXAMPLE_KEYS_PER_REASON]
  for result in results:  # in task order: the same report whatever the number of workers
    for reason, count in result.skipped.items():
      skipped[reason] = skipped.get(reason, 0) + count
      room = EXAMPLE_KEYS_PER_REASON - len(examples.setdefault(reason, []))
      examples[reason].extend(result.examples[reason][: max(room, 0)])
  return {
    "dataset": plan.name,
    "data_dir": os.path.abspath(plan.data_dir),
    "input": os.path.abspath(plan.input_dir),
    "input_shards": len(plan.tasks),
    "examples_read": sum(r.read for r in results) + sum(len(k) for k in plan.unlisted.values()),
    "written": {split: sum(r.counts[split] for r in results) for split in SPLITS},
    "shards": {},
    "skipped": dict(sorted(skipped.items())),
    "skipped_examples": dict(sorted(examples.items())),
    "filters": dataclasses.asdict(plan.filters),
  }


def options_from_flags(f) -> dict:
  """The ingest's keyword arguments from its absl flags (this CLI's and `ingest_beam`'s)."""
  return {
    "captions": f.captions,
    "validation_fraction": f.validation_fraction,
    "examples_per_shard": f.examples_per_shard,
    "filters": sources.Filters(
      min_size=f.min_size,
      max_aspect=f.max_aspect,
      resolution=f.resolution,
      image_format=f.image_format,
    ),
    "overwrite": f.overwrite,
  }


def summary_line(report: dict, name: str, data_dir: str) -> str:
  return (
    f"Wrote {report['written']} examples of {name} under {data_dir}; "
    f"skipped {report['skipped'] or 'none'} (see {REPORT_NAME})"
  )


def _main(argv) -> None:
  from absl import app, flags, logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  report = ingest(f.input, f.name, f.data_dir, workers=f.workers, **options_from_flags(f))
  logging.info("Ingest report: %s", json.dumps(report))
  print(summary_line(report, f.name, f.data_dir))


def _define_flags(beam: bool = False) -> None:
  """The ingest's flags; `beam`: those of `ingest_beam` (the runner's options, not --workers)."""
  from absl import flags

  flags.DEFINE_string("input", None, "Directory of webdataset .tar shards, or of images.")
  flags.DEFINE_string("captions", "", "CSV or JSONL captions file (file_name, caption).")
  flags.DEFINE_string("name", None, "Dataset name: --config.data.dataset reads it.")
  flags.DEFINE_string("data_dir", None, "TFDS data directory: --config.data.data_dir.")
  if not beam:
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "Worker processes.")
  flags.DEFINE_float("validation_fraction", 0.0, "Share of keys (by hash) for validation.")
  flags.DEFINE_integer("examples_per_shard", 10_000, "Rows per shard for captions-file input.")
  flags.DEFINE_integer("min_size", 0, "Skip images whose shorter side is below this (0: off).")
  flags.DEFINE_float("max_aspect", 0.0, "Skip images with long/short side above this (0: off).")
  flags.DEFINE_integer("resolution", 0, "Resize the shorter side down to this (0: keep).")
  flags.DEFINE_enum("image_format", "jpeg", ["jpeg", "png"], "Encoding of stored images.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing dataset directory.")
  flags.mark_flags_as_required(["input", "name", "data_dir"])


if __name__ == "__main__":
  from md_jax import cli_errors

  _define_flags()
  cli_errors.define_verbose_flag()
  cli_errors.run(_main)
