"""`md_jax.data.ingest_beam`: Beam's DirectRunner writes what the local ingest writes."""

import pathlib
import subprocess
import sys

import apache_beam as beam
import jax
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from array_record.python import array_record_module

from configs import data as data_config
from md_jax.data import ingest, ingest_beam
from md_jax.data.pipeline import create_input_iterator
from md_jax.data.prepare import prepare_dataset
from md_jax.infra import sharding
from tests.test_ingest import FILTERS, _make_tars

RUNNER = ["--runner=DirectRunner"]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """The test shards (a corrupt image, a missing caption, ...) ingested locally and by Beam."""
  tars = tmp_path_factory.mktemp("tars")
  _make_tars(tars)
  local, beam = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("beam")
  args = dict(validation_fraction=0.25, filters=FILTERS)
  local_report = ingest.ingest(str(tars), "my_images", str(local), workers=1, **args)
  beam_report = ingest_beam.ingest_beam(str(tars), "my_images", str(beam), beam_args=RUNNER, **args)
  return tars, (local, local_report), (beam, beam_report)


def _records(path: pathlib.Path) -> list[bytes]:
  reader = array_record_module.ArrayRecordReader(str(path))
  try:
    return [reader.read() for _ in range(reader.num_records())]
  finally:
    reader.close()


def _dataset_files(data_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  directory = data_dir / "my_images" / ingest.VERSION
  return {p.name: p for p in sorted(directory.iterdir())}


def test_beam_writes_the_local_records_and_report(both):
  _, (local, local_report), (beam, beam_report) = both
  without_dir = lambda r: {k: v for k, v in r.items() if k != "data_dir"}
  assert without_dir(beam_report) == without_dir(local_report)
  assert beam_report["skipped"]["undecodable_image"] == 1
  assert beam_report["skipped"]["missing_caption"] == 1
  local_files, beam_files = _dataset_files(local), _dataset_files(beam)
  assert sorted(beam_files) == sorted(local_files)
  shards = [n for n in local_files if ".array_record-" in n]
  assert len(shards) >= 4  # train and validation, over several input shards
  for name in shards:
    local_records, beam_records = _records(local_files[name]), _records(beam_files[name])
    assert local_records and len(beam_records) == len(local_records), name
    for i, (a, b) in enumerate(zip(local_records, beam_records, strict=True)):
      assert a == b, f"{name} record {i}"
  for name in ("dataset_info.json", "features.json"):
    assert beam_files[name].read_bytes() == local_files[name].read_bytes(), name


def test_the_input_pipeline_reads_the_beam_dataset_by_name(both):
  _, (local, local_report), (beam_dir, _) = both
  source = prepare_dataset("my_images", str(beam_dir)).as_data_source("train")
  assert len(source) == local_report["written"]["train"]
  config = data_config.get_config("tiny").data
  mesh = sharding.create_mesh((8, 1))
  batches = []
  for data_dir in (beam_dir, local):
    config.dataset, config.data_dir = "my_images", str(data_dir)
    it = create_input_iterator(
      config, global_batch_size=8, mesh=mesh, rules=sharding.DEFAULT_LOGICAL_AXIS_RULES, train=False
    )
    batches.append(jax.device_get(next(it)))
    it.close()
  assert batches[0]["image"].shape == (8, 32, 32, 3)
  for key in batches[1]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key], err_msg=key)


def test_skips_are_beam_metrics_equal_to_the_report(both, tmp_path):
  tars, (_, local_report), _ = both
  plan = ingest.plan_ingest(str(tars), "my_images", str(tmp_path), "", 0.25, 10_000, FILTERS, False)
  pipeline = beam.Pipeline(options=PipelineOptions(RUNNER))
  ingest_beam.build(pipeline, plan)
  result = pipeline.run()
  result.wait_until_finish()
  counters = result.metrics().query(MetricsFilter().with_namespace(ingest_beam.METRICS_NAMESPACE))
  counted = {c.key.metric.name: c.committed for c in counters["counters"]}
  expected = dict(local_report["skipped"])
  expected.update({f"written_{s}": n for s, n in local_report["written"].items()})
  assert counted == expected


def test_command_line_passes_beam_options_through(both, tmp_path):
  tars = both[0]
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "md_jax.data.ingest_beam",
      f"--input={tars}",
      "--name=my_images",
      f"--data_dir={tmp_path}",
      "--min_size=16",
      "--max_aspect=3",
      "--validation_fraction=0.25",
      "--runner=DirectRunner",
      "--direct_num_workers=1",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "skipped {'extreme_aspect': 1" in result.stdout
  local = _dataset_files(both[1][0])
  for name, path in _dataset_files(tmp_path).items():
    if ".array_record-" in name:
      assert path.read_bytes() == local[name].read_bytes(), name


def test_a_misspelt_ingest_flag_is_refused_not_passed_to_beam(both, tmp_path):
  with pytest.raises(ValueError, match=r"--min-size: not a flag \(did you mean --min_size\?\)"):
    ingest_beam.ingest_beam(
      str(both[0]), "my_images", str(tmp_path), beam_args=[*RUNNER, "--min-size=256"]
    )
