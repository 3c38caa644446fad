r"""How much a trained diffusion run's text encoding and UNet prediction move when one caption word
is swapped: a probe of which caption attributes the model conditions on.

  python -m md_jax.tools.caption_sensitivity --workdir=workdirs/main/diffusion \
      --caption="a large red circle in the center on a white background" \
      --swap=circle:square --swap=circle:star --swap=red:blue --swap=large:small

For each swap it prints ‖Δ‖/‖·‖ of the encoded caption (all tokens) and of the UNet's prediction
at several noise levels, on one shared noisy latent. A word whose swap moves the prediction far
less than the others is one the model has not learned to draw: the main job's shape kinds, for one
(BENCHMARKS.md, session 10). Last line: one JSON object.
"""

import json

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A diffusion-family run or checkpoint.")
_CAPTION = flags.DEFINE_string(
  "caption", "a large red circle in the center on a white background", "The reference caption."
)
_SWAPS = flags.DEFINE_multi_string(
  "swap", ["circle:square", "circle:star", "red:blue", "large:small"], "OLD:NEW word swaps."
)
_TIMESTEPS = flags.DEFINE_list("timesteps", ["900", "600", "300", "100"], "Noise levels t.")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "Image side the latent stands for.")


def relative_change(a, b) -> float:
  import jax.numpy as jnp

  return float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))


def sensitivity(workdir, caption, swaps, timesteps, resolution) -> dict:
  import jax
  import jax.numpy as jnp

  from md_jax.data import tokenizer as tokenizer_lib
  from md_jax.pipeline.text_to_image import TextToImage

  pipeline, params, _, _ = TextToImage.from_checkpoint(workdir, what="--workdir")
  captions = [caption]
  for swap in swaps:
    old, sep, new = swap.partition(":")
    if not sep or f" {old} " not in f" {caption} ":
      raise ValueError(f"--swap={swap!r}: expected OLD:NEW with OLD a word of --caption")
    captions.append(f" {caption} ".replace(f" {old} ", f" {new} ", 1).strip())
  tokens = jnp.asarray(tokenizer_lib.tokenize(pipeline.tokenizer, captions))
  text = pipeline.encode_text(params.text_encoder, tokens)
  x0 = jax.random.normal(jax.random.key(0), (1, *pipeline.latent_shape(resolution)))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  result = {swap: {"text": relative_change(text[0], text[i + 1])} for i, swap in enumerate(swaps)}
  for t in timesteps:
    x_t = pipeline.schedule.add_noise(x0, noise, jnp.array([t]))
    batch = len(captions)
    out = pipeline.unet.apply(
      {"params": params.unet}, jnp.repeat(x_t, batch, 0), jnp.full((batch,), t), text
    )
    for i, swap in enumerate(swaps):
      result[swap][f"t={t}"] = relative_change(out[0], out[i + 1])
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  timesteps = [int(t) for t in _TIMESTEPS.value]
  result = sensitivity(_WORKDIR.value, _CAPTION.value, _SWAPS.value, timesteps, _RESOLUTION.value)
  print(f"relative change of the text encoding and the UNet prediction, from {_CAPTION.value!r}:")
  for swap, changes in result.items():
    print(f"  {swap:20s} " + "  ".join(f"{k} {v:.3f}" for k, v in changes.items()))
  print(json.dumps(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
