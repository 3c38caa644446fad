"""Discrete-time noise schedules shared by training and every sampler.

A schedule is the table ᾱ_t (`alphas_cumprod`) for t = 0 … T-1, with
x_t = √ᾱ_t · x_0 + √(1-ᾱ_t) · ε. Everything else (targets, conversions between ε, v and x_0, SNR)
derives from it, so training and sampling cannot disagree about the forward process.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def _broadcast(values, like):
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


@flax.struct.dataclass
class NoiseSchedule:
  alphas_cumprod: jax.Array  # (T,) float32, decreasing from ≈1 to ≈0

  @property
  def num_steps(self) -> int:
    return self.alphas_cumprod.shape[0]

  def alpha_sigma(self, t, like):
    """√ᾱ_t and √(1-ᾱ_t), shaped to broadcast against `like`."""
    abar = _broadcast(self.alphas_cumprod[t], like)
    return jnp.sqrt(abar), jnp.sqrt(1 - abar)

  def add_noise(self, x0, noise, t):
    """Samples q(x_t | x_0) with the given noise."""
    alpha, sigma = self.alpha_sigma(t, x0)
    return alpha * x0 + sigma * noise

  def snr(self, t):
    abar = self.alphas_cumprod[t]
    return abar / (1 - abar)

  def v_target(self, x0, noise, t):
    """v = √ᾱ ε − √(1-ᾱ) x_0 (Salimans & Ho, 2022)."""
    alpha, sigma = self.alpha_sigma(t, x0)
    return alpha * noise - sigma * x0

  def to_x0_and_eps(self, model_output, x_t, t, prediction: str):
    """Reads a network output as (x̂_0, ε̂), whatever it was trained to predict."""
    alpha, sigma = self.alpha_sigma(t, x_t)
    if prediction == "eps":
      eps = model_output
      x0 = (x_t - sigma * eps) / alpha
    elif prediction == "v":
      x0 = alpha * x_t - sigma * model_output
      eps = sigma * x_t + alpha * model_output
    elif prediction == "x0":
      x0 = model_output
      eps = (x_t - alpha * x0) / sigma
    else:
      raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
    return x0, eps


def min_snr_weight(snr, gamma: float, prediction: str):
  """Min-SNR-γ loss weights (Hang et al., 2023), expressed for the chosen prediction target."""
  clipped = jnp.minimum(snr, gamma)
  return clipped / snr if prediction == "eps" else clipped / (snr + 1)


def scaled_linear(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
  """Stable Diffusion's schedule: β linear in √β."""
  betas = np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
  return NoiseSchedule(jnp.asarray(np.cumprod(1 - betas), jnp.float32))


def cosine(num_steps: int = 1000, offset: float = 0.008, max_beta: float = 0.999):
  """Nichol & Dhariwal's cosine schedule, β clipped at `max_beta` so ᾱ_T stays above zero."""
  f = lambda t: np.cos((t / num_steps + offset) / (1 + offset) * np.pi / 2) ** 2
  steps = np.arange(num_steps + 1, dtype=np.float64)
  betas = np.minimum(1 - f(steps[1:]) / f(steps[:-1]), max_beta)
  return NoiseSchedule(jnp.asarray(np.cumprod(1 - betas), jnp.float32))


def sample_timesteps(key, batch: int, num_steps: int, config=None) -> jax.Array:
  """Training timesteps (batch,) in [0, num_steps), drawn as `config` (`config.timesteps`) says.

  kind "uniform" (DDPM's); "logit_normal": t = ⌊T·sigmoid(z)⌋, z ~ N(logit_mean, logit_std²)
  (Esser et al., 2024, SD3) spends the batch on the middle noise levels instead of the ends, where
  the loss teaches little: nearly clean inputs need no caption, nearly pure noise holds no image. A
  negative mean moves the mass toward low noise, where small shapes' outlines are decided.
  """
  kind = "uniform" if config is None else config.kind
  if kind == "uniform":
    return jax.random.randint(key, (batch,), 0, num_steps)
  if kind == "logit_normal":
    if not config.logit_std > 0:
      raise ValueError(f"config.timesteps.logit_std={config.logit_std}: expected > 0")
    z = config.logit_mean + config.logit_std * jax.random.normal(key, (batch,))
    return jnp.minimum(jnp.floor(jax.nn.sigmoid(z) * num_steps), num_steps - 1).astype(jnp.int32)
  raise ValueError(f"config.timesteps.kind={kind!r}: expected 'uniform' or 'logit_normal'")


def from_config(config) -> NoiseSchedule:
  """`config.schedule`: kind ("scaled_linear" or "cosine") and num_steps."""
  if config.kind == "scaled_linear":
    return scaled_linear(config.num_steps)
  if config.kind == "cosine":
    return cosine(config.num_steps)
  raise ValueError(f"config.schedule.kind={config.kind!r}: expected 'scaled_linear' or 'cosine'")
