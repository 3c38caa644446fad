"""Prepares a TFDS dataset for index-based reading.

The input pipeline reads examples by index (`tfds.data_source`), which makes the data order a pure
function of (seed, step) and a resumed run see exactly the batches it would have seen. Random access
needs the ArrayRecord file format, while TFDS prepares datasets as TFRecord by default (and
`tfds.load` reads only that). So after the usual `download_and_prepare`, each split's shards are
copied record for record into ArrayRecord beside the TFRecord ones and the format is registered as
an alternative in `dataset_info.json`: both `tfds.load` and `tfds.data_source` then work.
This is what `tfds convert_format` does; its module needs Apache Beam, hence this small copy.
"""

import difflib
import logging

import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.core.utils import py_utils

_ARRAY_RECORD = file_adapters.FileFormat.ARRAY_RECORD


def prepare_dataset(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Builds (or finds) dataset `name` in `data_dir` and makes sure an ArrayRecord copy exists.

  `name` is a TFDS name such as "shapes/r64" or "coco_captions/2017". Datasets that need a
  manual download read it from `<data_dir>/downloads/manual` as TFDS documents for each.
  Returns a builder read from the prepared directory: unlike the code-defined builder, it knows
  the alternative formats recorded on disk, so `as_data_source` finds the ArrayRecord copy.
  """
  builder = check_dataset(name, data_dir)
  builder.download_and_prepare()
  prepared = tfds.builder_from_directory(builder.data_dir)
  if _ARRAY_RECORD not in prepared.info.available_file_formats():
    _add_array_record_copy(prepared)
    prepared = tfds.builder_from_directory(builder.data_dir)
  return prepared


def check_dataset(
  name: str, data_dir: str | None, what: str = "config.data.dataset"
) -> tfds.core.DatasetBuilder:
  """The (unprepared) builder of dataset `name`; an unknown dataset or config is one error naming
  `what`, with the closest names. Reads no data: a check before anything is built."""
  family = name.split("/")[0].split(":")[0]
  if family == "shapes":
    import md_jax.data.shapes  # noqa: F401  (registers the embedded builder)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(family, tfds.list_builders(with_community_datasets=False))
    hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
    raise ValueError(f"{what}={name!r}: no TFDS dataset {family!r}{hint}") from None
  except ValueError as e:  # a known dataset, an unknown builder config or version
    configs = [c.name for c in getattr(tfds.builder_cls(family), "BUILDER_CONFIGS", [])]
    config = name.split("/")[1].split(":")[0] if "/" in name else ""
    if configs and config not in configs:
      raise ValueError(
        f"{what}={name!r}: {family} has no config {config!r} (its configs: {', '.join(configs)})"
      ) from e
    raise ValueError(f"{what}={name!r}: {' '.join(str(e).split())}") from e


def _add_array_record_copy(builder: tfds.core.DatasetBuilder) -> None:
  info = builder.info
  reader = file_adapters.ADAPTER_FOR_FORMAT[info.file_format]
  writer = file_adapters.ADAPTER_FOR_FORMAT[_ARRAY_RECORD]
  for split_info in info.splits.values():
    in_template = split_info.filename_template
    out_template = in_template.replace(filetype_suffix=_ARRAY_RECORD.file_suffix)
    num_shards = split_info.num_shards
    for shard in range(num_shards):
      in_path = in_template.sharded_filepath(shard_index=shard, num_shards=num_shards)
      out_path = out_template.sharded_filepath(shard_index=shard, num_shards=num_shards)
      if out_path.exists():
        continue
      records = ((i, r.numpy()) for i, r in enumerate(reader.make_tf_data(filename=in_path)))
      # Written under a temporary name and renamed: an interrupted copy never looks complete.
      with py_utils.incomplete_file(out_path) as tmp_path:
        writer.write_examples(path=tmp_path, iterator=records)
    logging.info("Wrote an ArrayRecord copy of %s/%s", info.full_name, split_info.name)
  info.add_alternative_file_format(_ARRAY_RECORD)
  info.write_to_directory(builder.data_dir)
