"""An exported one-step pipeline (`md_jax.export`'s `one_step_b<N>`) behind the interface the
evaluation loop calls (`caption_eval.evaluate_images`), so a phone artifact is scored on the same
captions, with the same noise, by the same metrics as the JAX model it came from.

    pipeline, params, _, _ = TextToImage.from_checkpoint(run)
    artifact = ArtifactPipeline.load("export/one_step_b1/int8.tflite", pipeline)
    images = artifact.generate(params, tokens, seed=key, sampler="ufogen", steps=1)

Runtimes: LiteRT (`fp32.tflite`, `fp16.tflite`, `int8.tflite`, `int8_static.tflite`) and IREE
(`host.vmfb`); the Android `.vmfb` is not scored here: the same program as `host.vmfb`, it runs
only under emulation (~165× slower; `md_jax.export.verify` checks it there). The artifact runs on
the host in this one process: `load` refuses a multi-process JAX runtime rather than have every
process run every row.

Same images as `TextToImage.generate(..., sampler="ufogen", steps=1)` up to the runtime's
arithmetic: the noise is drawn by the same call on the same key (`_noise`), and the artifact's
[0, 1] image is quantised by `to_pixels`, which equals `text_to_image.to_uint8` of the decoded
[−1, 1] image bit for bit (see there).
"""

import dataclasses
import functools
import os
import pathlib

import jax
import numpy as np

from md_jax.data import tokenizer as tokenizer_lib
from md_jax.export import manifest as manifest_lib
from md_jax.pipeline import text_to_image

# The manifest's file keys (`entry["files"]`) this host can run; a result names its format so.
FORMATS = ("litert_fp32", "litert_fp16", "litert_int8", "litert_int8_static", "iree_host")
NOT_RUNNABLE_HERE = {
  "iree_android_arm64": "cross-compiled for Android arm64 (score host.vmfb, the same program; "
  "`md_jax.export.verify` runs this one under qemu-user)"
}


def to_pixels(image) -> np.ndarray:
  """float32 [0, 1] (the artifact's `image`) → uint8, as `to_uint8` quantises the decoded d.

  The artifact computes image = clip((d + 1) · 0.5, 0, 1) and this rounds image · 255; JAX rounds
  (d + 1) · 127.5 and clips. Halving is exact in float32, so image · 255 is the one rounding of
  the same real number (d + 1) · 127.5: the same float, the same pixel, and clipping before or
  after the rounding picks the same end pixel (tested a few ulps either side of every rounding
  boundary and on 10⁵ random values in [−1.05, 1.05])."""
  image = np.asarray(image, np.float32)
  return np.clip(np.round(image * np.float32(255)), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class ArtifactPipeline:
  """`tokenizer`, `resolution` and `generate` of a `TextToImage`, computed by one artifact."""

  path: pathlib.Path
  format: str  # one of FORMATS
  batch: int  # the artifact's fixed batch size: rows run in chunks of it
  resolution: int
  latent_shape: tuple[int, ...]
  tokenizer: object
  source: dict  # the manifest's: checkpoint, stage, step, config_sha256
  run: object  # {input name: array} → image (batch, R, R, 3) float32 in [0, 1]

  @classmethod
  def load(cls, path, pipeline, threads: int | None = None) -> "ArtifactPipeline":
    """The artifact at `path` (DIR/one_step_b<N>/<format file>, DIR holding manifest.json),
    with `pipeline`'s tokenizer (the checkpoint it was exported from). `threads`: LiteRT's CPU
    threads (default: the cores this process may run on)."""
    from md_jax.export import iree, litert, verify

    if jax.process_count() > 1:
      raise ValueError(
        f"--artifact={path}: artifact evaluation runs in one process; this is process "
        f"{jax.process_index()} of {jax.process_count()} (drop --distributed)"
      )
    path = pathlib.Path(path)
    directory = path.parent.parent
    if not path.is_file():
      raise FileNotFoundError(f"--artifact={path}: no such file")
    try:
      found = manifest_lib.read(directory)
    except FileNotFoundError:
      raise FileNotFoundError(
        f"--artifact={path}: no {manifest_lib.NAME} in {directory} (expected "
        "EXPORT_DIR/<program>_b<N>/<file>, as md_jax.export writes it)"
      ) from None
    relative = path.relative_to(directory).as_posix()
    matches = [
      (entry, key)
      for entry in found["artifacts"]
      for key, file in entry["files"].items()
      if file == relative
    ]
    if not matches:
      raise ValueError(f"--artifact={path}: {directory / manifest_lib.NAME} lists no such file")
    entry, key = matches[0]
    if entry["program"] != "one_step":
      raise ValueError(
        f"--artifact={path}: a {entry['program']!r} program; the evaluator runs the fused "
        "one_step pipeline (export it with --programs=one_step)"
      )
    if key in NOT_RUNNABLE_HERE:
      raise ValueError(f"--artifact={path}: {NOT_RUNNABLE_HERE[key]}, cannot run on this host")
    if key not in FORMATS:
      raise ValueError(
        f"--artifact={path}: a {key!r} file; expected one of {sorted(FORMATS)} "
        "(.tflite or host .vmfb)"
      )
    verify.artifact_file(directory, entry, key)  # its size as the manifest records it
    inputs = {spec["name"]: spec for spec in entry["inputs"]}
    noise = tuple(inputs["noise"]["shape"])
    resolution = entry["outputs"][0]["shape"][1]
    expected = tuple(pipeline.latent_shape(resolution))
    if noise[1:] != expected:
      raise ValueError(
        f"--artifact={path}: noise {noise[1:]} per image, the checkpoint's model draws "
        f"{expected} at {resolution} px: exported from another model"
      )
    if key.startswith("litert_"):
      threads = threads or len(os.sched_getaffinity(0))
      runner = litert.Runner(path, threads)
      output = entry["outputs"][0]["name"]
      run = lambda feed: runner(feed)[output]
    else:
      run = iree.Runner(path, [spec["name"] for spec in entry["inputs"]])
    return cls(
      path=path, format=key, batch=int(entry["batch"]), resolution=int(resolution),
      latent_shape=expected, tokenizer=pipeline.tokenizer, source=found.get("source", {}),
      run=run,
    )  # fmt: skip

  def check(self, *, sampler, steps, eta=0.0, guided=False, resolution=None) -> None:
    """Raises, naming the artifact, unless the setting is what the one-step program computes."""
    if sampler != "ufogen" or steps != 1:
      raise ValueError(
        f"--artifact={self.path}: the exported one-step pipeline is sampler 'ufogen' with 1 step, "
        f"not {sampler!r} with {steps} (pass --sampler=ufogen --steps=1)"
      )
    if eta != 0.0 or guided:
      raise ValueError(f"--artifact={self.path}: the one-step pipeline takes no eta or guidance")
    if resolution not in (None, self.resolution):
      raise ValueError(
        f"--artifact={self.path}: exported at {self.resolution} px; asked for {resolution} px"
      )

  def generate(
    self, params, tokens, *, seed=0, resolution=None, sampler="ufogen", steps=1, cfg=1.0,
    eta=0.0, guide=None, classifier_guide=None,
  ):  # fmt: skip
    """uint8 images (N, R, R, 3) for prompts or token ids (N, 77): `TextToImage.generate`'s with
    sampler "ufogen" and one step, the only setting the one-step program computes. `params` is
    unused (the weights are the artifact's constants); `cfg` is ignored, as UFOGen's is."""
    del params, cfg
    self.check(sampler=sampler, steps=steps, eta=eta, resolution=resolution,
               guided=guide is not None or classifier_guide is not None)  # fmt: skip
    if len(tokens) and isinstance(tokens[0], str):  # prompts, as TextToImage.generate takes
      tokens = tokenizer_lib.tokenize(self.tokenizer, tokens)
    sharding = getattr(tokens, "sharding", None)
    tokens = np.asarray(tokens, np.int32)
    noise = np.asarray(_noise(text_to_image.as_key(seed), (len(tokens), *self.latent_shape)))
    pad = -len(tokens) % self.batch  # the artifact's batch is fixed: the last chunk is padded
    tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])
    noise = np.concatenate([noise, np.repeat(noise[-1:], pad, 0)])
    images = [
      self.run({"token_ids": tokens[i : i + self.batch], "noise": noise[i : i + self.batch]})
      for i in range(0, len(tokens), self.batch)
    ]
    pixels = to_pixels(np.concatenate(images)[: len(tokens) - pad])
    if isinstance(sharding, jax.sharding.NamedSharding):  # rows where the JAX model's would be
      spec = jax.sharding.PartitionSpec(sharding.spec[0] if sharding.spec else None)
      return jax.device_put(pixels, jax.sharding.NamedSharding(sharding.mesh, spec))
    return pixels


@functools.partial(jax.jit, static_argnums=1)
def _noise(key, shape):
  """`TextToImage._generate`'s x_T: the same call on the same key (jitted, as there)."""
  return jax.random.normal(key, shape)
