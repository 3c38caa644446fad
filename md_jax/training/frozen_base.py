"""The loss of modules trained against a frozen base diffusion model (a control plugin, LoRA
factors): the base's own diffusion loss, whatever the module adds to its UNet call."""

import jax
import jax.numpy as jnp

from md_jax.diffusion import schedules


def diffusion_loss(
  pipeline, config, unet_params, text_encoder, autoencoder, images, tokens, key, dropout: float,
  **unet_kwargs,
):  # fmt: skip
  """The base's loss on one batch: its prediction target (ε or v), its timestep density
  (`config.timesteps`) and min-SNR weights (`config.min_snr_gamma`), captions dropped at rate
  `dropout` for classifier-free guidance. t, noise and the dropped captions are drawn from `key`;
  `unet_kwargs` go to the UNet call (e.g. a plugin's `adapter_features`)."""
  schedule, unet = pipeline.schedule, pipeline.unet
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  batch_size = tokens.shape[0]
  drop = jax.random.bernoulli(k_drop, dropout, (batch_size,))
  if not unet.learned_null_text:
    tokens = jnp.where(drop[:, None], pipeline.null_tokens[None], tokens)
  x0 = pipeline.latent_space.encode(autoencoder, images)
  t = schedules.sample_timesteps(k_t, batch_size, schedule.num_steps, config.timesteps)
  noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  x_t = schedule.add_noise(x0, noise, t)
  target = noise if pipeline.prediction == "eps" else schedule.v_target(x0, noise, t)
  weights = jnp.ones((batch_size,))
  if config.get("min_snr_gamma", 0) > 0:
    weights = schedules.min_snr_weight(schedule.snr(t), config.min_snr_gamma, pipeline.prediction)
  text = pipeline.encode_text(text_encoder, tokens)
  pred = unet.apply(
    {"params": unet_params}, x_t, t, text,
    drop_text=drop if unet.learned_null_text else None, **unet_kwargs,
  )  # fmt: skip
  per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
  return jnp.mean(weights * per_example)
