r"""Writes a `lora` run's factors (EMA) as a LoRA file that `generate --lora` and the evaluators
apply to the base UNet or any UNet of its layout (the one-step UFOGen generator included):

  python -m md_jax.tools.export_lora --workdir=workdirs/lora --out=concept.safetensors [--raw]

`--workdir`: the run (its latest checkpoint) or one checkpoint step's directory. Prints the
manifest's summary as one JSON line.
"""

import json
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A `lora` run or one of its checkpoints.")
_OUT = flags.DEFINE_string("out", None, "The .safetensors file to write (local or gs://).")
_RAW = flags.DEFINE_bool("raw", False, "The trained factors instead of their EMA.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from md_jax.infra.checkpoints import CheckpointError
  from md_jax.pipeline import lora_file, lora_run

  try:
    manifest = lora_run.export_checkpoint(_WORKDIR.value, _OUT.value, use_ema=not _RAW.value)
  except (FileNotFoundError, ValueError, CheckpointError) as e:
    sys.exit(f"FATAL {e}")
  manifest["file"] = _OUT.value
  print(json.dumps({**lora_file.describe(manifest, 1.0), "info": manifest.get("info")}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
