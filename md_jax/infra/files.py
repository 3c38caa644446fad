"""Files written whole: under a temporary name beside the target, then renamed over it, so a
reader (a resumed run, another process) sees the complete file or none. Local paths and GCS alike
(`etils.epath`)."""

from etils import epath


def write_whole(path, data: bytes | str) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.parent / f".{path.name}.partial"
  if isinstance(data, str):
    partial.write_text(data)
  else:
    partial.write_bytes(data)
  # `replace`, not `rename`: epath's rename refuses an existing target, so a run continued to
  # more steps could not write its file again.
  partial.replace(path)
