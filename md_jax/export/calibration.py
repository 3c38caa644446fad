"""Representative inputs for static (full-integer) quantization: what a program sees on a phone.

Static int8 fixes every activation's range ahead of time from the float model's values on these
inputs, so they are drawn as the app draws them:
  token_ids        real captions of the checkpoint's training split (never the held-out split the
                   evaluator scores), tokenized by the checkpoint's tokenizer; a batch of 2 (the
                   classifier-free guidance batch) has the empty prompt in its second row
  noise, latents,  unit Gaussian: the sampler's x_T, and the scaled latents' unit variance
  x0_estimate
  timestep         spread evenly over the whole schedule [0, T − 1] (a UNet call at t = T − 1 and
                   one at t = 0 see very different activation ranges)
  text_embeddings  the text encoder's output on the captions' tokens
  guidance         spread over [1, 8], a distilled student's usual guidance scales
"""

import jax
import ml_collections
import numpy as np

from md_jax.data import pipeline as data_pipeline
from md_jax.data import tokenizer as tokenizer_lib
from md_jax.infra import checkpoints

MIN_SAMPLES = 1
MAX_SAMPLES = 10_000  # the calibrator keeps each sample's every tensor in turn: minutes per 1K


def check_num_samples(num) -> int:
  if isinstance(num, bool) or not isinstance(num, int) or not MIN_SAMPLES <= num <= MAX_SAMPLES:
    raise ValueError(
      f"--calibration_samples={num!r}: expected an integer in [{MIN_SAMPLES}, {MAX_SAMPLES}]"
    )
  return num


def training_captions_available(source) -> str:
  """The checkpoint whose captions calibrate `source`'s programs; raises before any export
  work when there is none."""
  checkpoint = source.description.get("checkpoint")
  if not checkpoint or source.pipeline is None:
    raise ValueError(
      "static int8 calibrates on a diffusion checkpoint's captions: export one with --workdir "
      "or --checkpoint, not random weights (--config) or a vae / decoder_distill run"
    )
  return checkpoint


def training_captions(source, num: int, seed: int = 0) -> list[str]:
  """`num` captions of the source checkpoint's training split, spread over it by `seed`."""
  checkpoint = training_captions_available(source)
  config = ml_collections.ConfigDict(checkpoints.saved_config(checkpoint))
  data_config = config.data
  size = len(data_pipeline.image_source(data_config))
  rng = np.random.default_rng(seed)
  # Twice as many rows as needed: examples without a caption are skipped, as training skips them.
  rows = np.sort(rng.choice(size, size=min(size, 2 * num), replace=False))
  found = [c for c in data_pipeline.eval_captions(data_config, rows) if c]
  if not found:
    raise ValueError(f"{data_config.dataset} split {data_config.split!r}: no captions")
  return [found[i % len(found)] for i in rng.permutation(max(num, len(found)))[:num]]


def calibration_inputs(program, source, num: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """`num` input dicts for `program` ({input name: array} of its shapes and dtypes)."""
  check_num_samples(num)
  pipeline = source.pipeline
  rng = np.random.default_rng(seed)
  names = {spec.name for spec in program.inputs}
  if "condition" in names:  # Gaussian noise is no condition map: the ranges would be wrong
    raise ValueError(
      f"{program.name}: litert_int8_static cannot calibrate a plugin's condition input yet; "
      "export it with dynamic-range int8 (litert_int8)"
    )
  batch = program.batch
  captions = None
  if names & {"token_ids", "text_embeddings"}:
    captions = training_captions(source, num * batch, seed)
    if batch == 2:  # the guidance batch: (prompt, empty prompt), as the sampler batches them
      captions = [c if i % 2 == 0 else "" for i, c in enumerate(captions)]
    tokens = tokenizer_lib.tokenize(pipeline.tokenizer, captions).astype(np.int32)
    tokens = tokens.reshape(num, batch, -1)
  if "text_embeddings" in names:
    encode = jax.jit(pipeline.encode_text)
    embeddings = [np.asarray(encode(source.params.text_encoder, t), np.float32) for t in tokens]
  # Evenly over the schedule, shuffled so each sample's rows see different timesteps.
  count = num * batch
  steps = pipeline.schedule.num_steps if pipeline is not None else 1
  timesteps = rng.permutation(np.linspace(0, steps - 1, count).round().astype(np.int32))
  guidance = rng.permutation(np.linspace(1.0, 8.0, count).astype(np.float32))
  samples = []
  for i in range(num):
    sample = {}
    for spec in program.inputs:
      if spec.name == "token_ids":
        value = tokens[i]
      elif spec.name == "text_embeddings":
        value = embeddings[i]
      elif spec.name == "timestep":
        value = timesteps[i * batch : (i + 1) * batch]
      elif spec.name == "guidance":
        value = guidance[i * batch : (i + 1) * batch]
      else:  # noise, latents, x0_estimate
        value = rng.standard_normal(spec.shape, np.float32)
      sample[spec.name] = np.asarray(value, spec.dtype).reshape(spec.shape)
    samples.append(sample)
  return samples
