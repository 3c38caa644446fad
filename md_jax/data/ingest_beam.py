"""`md_jax.data.ingest` as an Apache Beam pipeline, for inputs that outgrow one machine.

    python -m md_jax.data.ingest_beam --input=/data/tars --name=my_images --data_dir=/data/tfds \
        --min_size=256 --max_aspect=2 --runner=DirectRunner --direct_num_workers=8 \
        --direct_running_mode=multi_processing
    python -m md_jax.data.ingest_beam --input=/mnt/shared/tars --name=my_images \
        --data_dir=/mnt/shared/tfds --runner=FlinkRunner --flink_master=HOST:8081
    python -m md_jax.data.ingest_beam --input=/mnt/shared/tars --name=my_images \
        --data_dir=/mnt/shared/tfds --runner=DataflowRunner --project=PROJECT \
        --region=us-central1 --temp_location=gs://BUCKET/tmp --setup_file=./setup.py \
        --sdk_container_image=IMAGE_THAT_MOUNTS_/mnt/shared

The ingest's flags (--input, --name, --data_dir, --captions, --validation_fraction,
--examples_per_shard, --min_size, --max_aspect, --resolution, --image_format, --overwrite) mean
what they mean there; every other flag is a Beam pipeline option, passed through as it is (the
runner's own options included), so any runner Beam supports can run it.

The transform is the local one, not a copy: the launcher lists the input's tasks
(`ingest.plan_ingest`: one per tar shard or per block of captions), the workers run
`ingest.run_task` on each (decode, filters, skip reasons, serialization, one ArrayRecord file per
task and split, in the shard's own order), and one worker ends with `ingest.finish` (TFDS shard
names in task order, dataset_info.json, ingest_report.json, the rename into place). Beam's element
order is not deterministic, but nothing here depends on it: each task's records are written in
input order by the worker that reads it, and `finish` sorts the tasks' results by index, so the
directory equals the local ingest's byte for byte. Skips are also counted as Beam metrics
(namespace "md_jax.ingest", one counter per reason) in the runner's monitoring.

What every worker needs: md_jax and its requirements (`--setup_file=./setup.py` ships both to
Dataflow; a Flink or Spark cluster's Python environment has them installed), and the input and
--data_dir at the same paths as the launcher, i.e. a shared filesystem (the cluster's NFS; on
Dataflow a custom container that mounts the bucket with GCS FUSE or a Filestore share). `gs://`
paths are not read or written directly: tarfile, ArrayRecord's writer and the final rename all
work on local paths. The launcher lists the input; a captions file's rows travel inside the tasks,
a tar shard is read by the worker that gets it.
"""

import difflib
import json
import pathlib

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from md_jax.data import ingest
from md_jax.data import ingest_sources as sources

METRICS_NAMESPACE = "md_jax.ingest"


def _run_task(args) -> ingest.TaskResult:
  result = ingest.run_task(args)
  for reason, count in result.skipped.items():
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, reason).inc(count)
  for split, count in result.counts.items():
    beam.metrics.Metrics.counter(METRICS_NAMESPACE, f"written_{split}").inc(count)
  return result


def _finish(results: list[ingest.TaskResult], plan: ingest.Plan) -> dict:
  return ingest.finish(plan, results)


def build(pipeline: beam.Pipeline, plan: ingest.Plan) -> beam.PCollection:
  """The ingest's transform on `pipeline`: a one-element PCollection holding the report."""
  return (
    pipeline
    | "Tasks" >> beam.Create(plan.task_args())
    # Spreads the tasks over workers: Create's elements would otherwise stay in one bundle.
    | "Spread" >> beam.Reshuffle()
    | "RunTask" >> beam.Map(_run_task)
    | "Gather" >> beam.combiners.ToList()
    | "Finish" >> beam.Map(_finish, plan)
  )


def ingest_beam(
  input_dir: str,
  name: str,
  data_dir: str,
  *,
  captions: str = "",
  validation_fraction: float = 0.0,
  examples_per_shard: int = 10_000,
  filters: sources.Filters | None = None,
  overwrite: bool = False,
  beam_args: list[str] | None = None,
) -> dict:
  """`ingest.ingest` run by Beam with the pipeline options `beam_args` (DirectRunner when none);
  returns the report, as read back from `<data_dir>/<name>/1.0.0/ingest_report.json`."""
  filters = filters or sources.Filters()
  _check_beam_args(beam_args or [])
  plan = ingest.plan_ingest(
    input_dir, name, data_dir, captions, validation_fraction, examples_per_shard, filters, overwrite
  )
  options = PipelineOptions(beam_args or ["--runner=DirectRunner"])
  with beam.Pipeline(options=options) as pipeline:
    build(pipeline, plan)
  return _read_report(plan)


INGEST_FLAGS = (
  "--input", "--captions", "--name", "--data_dir", "--validation_fraction",
  "--examples_per_shard", "--min_size", "--max_aspect", "--resolution", "--image_format",
  "--overwrite",
)  # fmt: skip


def _check_beam_args(beam_args: list[str]) -> None:
  """Beam drops an option it does not know with a warning: a misspelt ingest flag (--min-size)
  would run the whole ingest without its filter."""
  for arg in beam_args:
    flag = arg.split("=", 1)[0]
    close = difflib.get_close_matches(flag, INGEST_FLAGS, n=1, cutoff=0.8)
    if close:
      raise ValueError(f"{flag}: not a flag (did you mean {close[0]}?)")


def _read_report(plan: ingest.Plan) -> dict:
  return json.loads((pathlib.Path(plan.final) / ingest.REPORT_NAME).read_text())


def _main(argv) -> None:
  from absl import flags

  f = flags.FLAGS
  report = ingest_beam(
    f.input, f.name, f.data_dir, beam_args=argv[1:], **ingest.options_from_flags(f)
  )
  print(ingest.summary_line(report, f.name, f.data_dir))


def _parse_flags(argv):
  """The ingest's flags for us, every other one left in argv for Beam's PipelineOptions."""
  from absl import flags

  from md_jax import cli_errors

  try:
    return flags.FLAGS(argv, known_only=True)
  except flags.Error as e:
    cli_errors.fatal(str(e))


if __name__ == "__main__":
  from md_jax import cli_errors

  ingest._define_flags(beam=True)
  cli_errors.define_verbose_flag()
  cli_errors.run(_main, flags_parser=_parse_flags)
