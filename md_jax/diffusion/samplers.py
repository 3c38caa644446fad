"""Samplers over one shared noise schedule, compiled as one loop (`lax.fori_loop`)."""

import jax
import jax.numpy as jnp

from md_jax.diffusion.schedules import NoiseSchedule


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> jax.Array:
  """`num_steps` timesteps from T-1 down to 0, evenly spaced (the "trailing" DDIM spacing)."""
  return jnp.round(jnp.linspace(schedule.num_steps - 1, 0, num_steps)).astype(jnp.int32)


def ddim_sample(
  denoise_fn, schedule: NoiseSchedule, x_T, num_steps: int, *, prediction: str, eta=0.0, rng=None
):
  """DDIM (Song et al., 2021): deterministic at η = 0, DDPM-like at η = 1.

  `denoise_fn(x_t, t)` returns the network's prediction (ε, v or x_0 per `prediction`), with any
  classifier-free guidance already applied.
  """
  timesteps = ddim_timesteps(schedule, num_steps)
  abar = schedule.alphas_cumprod
  rng = jax.random.key(0) if rng is None else rng

  def step(i, x):
    t = timesteps[i]
    t_prev = jnp.where(i + 1 < num_steps, timesteps[jnp.minimum(i + 1, num_steps - 1)], -1)
    out = denoise_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    x0, eps = schedule.to_x0_and_eps(out, x, jnp.full((x.shape[0],), t), prediction)
    a_t = abar[t]
    a_prev = jnp.where(t_prev >= 0, abar[jnp.maximum(t_prev, 0)], 1.0)
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    direction = jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0)) * eps
    return jnp.sqrt(a_prev) * x0 + direction + sigma * noise

  return jax.lax.fori_loop(0, num_steps, step, x_T)


def classifier_free_guidance(model_fn, cond, uncond, scale: float):
  """Wraps `model_fn(x, t, text)` into `denoise_fn(x, t)`: uncond + s·(cond − uncond).

  Conditional and unconditional halves run as one batch of 2B, as a mobile runtime would.
  """

  def denoise(x, t):
    both = model_fn(
      jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, uncond])
    )
    c, u = jnp.split(both, 2)
    return u + scale * (c - u)

  return denoise
