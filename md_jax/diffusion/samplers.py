"""Samplers over one shared noise schedule, compiled as one loop (`lax.fori_loop`)."""

import jax
import jax.numpy as jnp

from md_jax.diffusion.schedules import NoiseSchedule

SPACINGS = ("linspace", "trailing")


def ddim_timesteps(
  schedule: NoiseSchedule, num_steps: int, start: int | None = None, spacing: str = "linspace"
) -> jax.Array:
  """`num_steps` timesteps from `start` (default T-1) down, each the start of one step; the last
  step goes to the clean end.

  "linspace": evenly spaced from `start` down to 0 inclusive (the samplers' default; its last
  step, 0 → clean, moves almost nothing, so N steps make N − 1 jumps). "trailing": the N equal
  jumps start·k/N (k = N … 1) minus one, as diffusers' `timestep_spacing="trailing"`; the 2N-step
  grid holds the N-step one at every other point, which is what progressive distillation's
  student and teacher share (`training/step_distill.py`).
  """
  start = schedule.num_steps - 1 if start is None else start
  if spacing == "linspace":
    return jnp.round(jnp.linspace(start, 0, num_steps)).astype(jnp.int32)
  if spacing == "trailing":
    return trailing_timesteps(start + 1, num_steps, jnp.arange(num_steps))
  raise ValueError(f"spacing={spacing!r}: expected one of {SPACINGS}")


def trailing_timesteps(length, num_steps, index):
  """The `index`-th timestep (−1: the clean end, at index = num_steps) of the trailing grid of
  `num_steps` over `length` timesteps; traceable in all three."""
  exact = jnp.asarray(length, jnp.float32) * (num_steps - index) / num_steps
  return jnp.round(exact).astype(jnp.int32) - 1


def ddim_sample(
  denoise_fn, schedule: NoiseSchedule, x_T, num_steps: int, *, prediction: str, eta=0.0, rng=None,
  start: int | None = None, self_condition: bool = False, spacing: str = "linspace",
):  # fmt: skip
  """DDIM (Song et al., 2021): deterministic at η = 0, DDPM-like at η = 1.

  `self_condition`: `denoise_fn(x_t, t, x0_estimate)` also takes the previous step's x̂_0 (zeros
  at the first step), for a self-conditioned UNet.

  `denoise_fn(x_t, t)` returns the network's prediction (ε, v or x_0 per `prediction`), with any
  classifier-free guidance already applied. `start`: the timestep `x_T` is noised to (default
  T-1); a smaller one continues a partly noised image (SDEdit, Meng et al., 2022). `spacing`:
  the timestep grid (`ddim_timesteps`).
  """
  timesteps = ddim_timesteps(schedule, num_steps, start, spacing)
  abar = schedule.alphas_cumprod
  rng = jax.random.key(0) if rng is None else rng

  def step(i, carry):
    x, x0_estimate = carry
    t = timesteps[i]
    t_prev = jnp.where(i + 1 < num_steps, timesteps[jnp.minimum(i + 1, num_steps - 1)], -1)
    ts = jnp.full((x.shape[0],), t, jnp.int32)
    out = denoise_fn(x, ts, x0_estimate) if self_condition else denoise_fn(x, ts)
    x0, eps = schedule.to_x0_and_eps(out, x, jnp.full((x.shape[0],), t), prediction)
    a_t = abar[t]
    a_prev = jnp.where(t_prev >= 0, abar[jnp.maximum(t_prev, 0)], 1.0)
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    direction = jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0)) * eps
    return jnp.sqrt(a_prev) * x0 + direction + sigma * noise, x0

  return jax.lax.fori_loop(0, num_steps, step, (x_T, jnp.zeros_like(x_T)))[0]


def _alpha_sigma_lambda(schedule: NoiseSchedule, t):
  """α_t, σ_t and λ_t = log(α_t/σ_t) at integer t, with t = −1 the clean end (α 1, σ 0, λ ∞)."""
  abar = jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)
  alpha, sigma = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
  return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)


def dpm_solver_pp_2m_sample(
  denoise_fn, schedule: NoiseSchedule, x_T, num_steps: int, *, prediction: str,
  self_condition: bool = False,
):  # fmt: skip
  """DPM-Solver++(2M) (Lu et al., 2022, Alg. 2): a second-order multistep solver of the
  probability-flow ODE in x̂_0 form, one network call per step.

  Each step from s to t (h = λ_t − λ_s) is x_t = (σ_t/σ_s)·x_s − α_t(e^{−h} − 1)·D, with D = x̂_0(s)
  for the first and the last step (first order: DDIM) and, in between, the extrapolation
  D = (1 + 1/2r)·x̂_0(s) − (1/2r)·x̂_0(s′) from the previous step's prediction, r = h_prev/h.
  `self_condition`: as in `ddim_sample`, the previous step's x̂_0 goes to `denoise_fn` too.
  """
  timesteps = ddim_timesteps(schedule, num_steps)

  def step(i, carry):
    x, x0_prev = carry
    t = timesteps[i]
    t_next = jnp.where(i + 1 < num_steps, timesteps[jnp.minimum(i + 1, num_steps - 1)], -1)
    t_prev = timesteps[jnp.maximum(i - 1, 0)]
    ts = jnp.full((x.shape[0],), t, jnp.int32)
    out = denoise_fn(x, ts, x0_prev) if self_condition else denoise_fn(x, ts)
    x0, _ = schedule.to_x0_and_eps(out, x, jnp.full((x.shape[0],), t), prediction)
    _, sigma_s, lambda_s = _alpha_sigma_lambda(schedule, t)
    alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(schedule, t_next)
    _, _, lambda_prev = _alpha_sigma_lambda(schedule, t_prev)
    h = lambda_t - lambda_s
    r = (lambda_s - lambda_prev) / jnp.where(jnp.isfinite(h), h, 1.0)
    second_order = (i > 0) & (t_next >= 0)
    d = jnp.where(
      second_order, (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0
    )  # at the last step h = ∞: e^{−h} = 0 and the step returns D = x̂_0
    x = (sigma_t / sigma_s) * x - alpha_t * jnp.expm1(-h) * d
    return x, x0

  x, _ = jax.lax.fori_loop(0, num_steps, step, (x_T, jnp.zeros_like(x_T)))
  return x


def ufogen_sample(
  generator_fn, schedule: NoiseSchedule, x_T, num_steps: int, *, prediction: str, rng=None,
  self_condition: bool = False,
):  # fmt: skip
  """UFOGen sampling (Xu et al., 2023; paper Sec. 4): x̂_0 = G(x_t, t) at each of `num_steps`
  timesteps from T−1 down; between steps x̂_0 is re-noised to the next t with fresh noise,
  x_t′ ~ q(x_t′ | x̂_0). One step is x_T → G(x_T, T−1). `self_condition`: G also takes the last
  x̂_0 (none, i.e. zeros, at the first step, so a one-step G needs no second input)."""
  timesteps = ddim_timesteps(schedule, num_steps)
  if num_steps == 1:
    # No loop and no re-noising: the plain graph an exported one-step pipeline is (no RNG ops,
    # which mobile converters do not take).
    t = jnp.full((x_T.shape[0],), timesteps[0], jnp.int32)
    return schedule.to_x0_and_eps(generator_fn(x_T, t), x_T, t, prediction)[0]
  rng = jax.random.key(0) if rng is None else rng

  def step(i, carry):
    x, x0_prev = carry
    t = jnp.full((x.shape[0],), timesteps[i], jnp.int32)
    out = generator_fn(x, t, x0_prev) if self_condition else generator_fn(x, t)
    x0, _ = schedule.to_x0_and_eps(out, x, t, prediction)
    t_next = jnp.full_like(t, timesteps[jnp.minimum(i + 1, num_steps - 1)])
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    return schedule.add_noise(x0, noise, t_next), x0

  _, x0 = jax.lax.fori_loop(0, num_steps, step, (x_T, jnp.zeros_like(x_T)))
  return x0


def classifier_free_guidance(model_fn, cond, uncond, scale: float):
  """Wraps `model_fn(x, t, text)` into `denoise_fn(x, t)`: uncond + s·(cond − uncond).

  Conditional and unconditional halves run as one batch of 2B, as a mobile runtime would.
  """

  def denoise(x, t, *x0_estimate):
    # A self-conditioning sampler passes the previous guided x̂_0, the same to both halves.
    extra = {"x0_estimate": jnp.concatenate([x0_estimate[0]] * 2)} if x0_estimate else {}
    both = model_fn(
      jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, uncond]), **extra
    )
    c, u = jnp.split(both, 2)
    return u + scale * (c - u)

  return denoise


def autoguidance(good_fn, guide_fn, scale: float):
  """`denoise_fn(x, t)` = guide + s·(good − guide), where `guide_fn` is a weaker version of
  `good_fn` (less trained or smaller) under the same conditioning: autoguidance (Karras et al.,
  2024, "Guiding a Diffusion Model with a Bad Version of Itself").

  Unlike classifier-free guidance, which pushes away from the unconditional prediction, this
  pushes along what the better model learned and the weaker one had not yet: the late-learned,
  fine conditional detail.
  """

  def denoise(x, t, *x0_estimate):  # a self-conditioning sampler's x̂_0 goes to both models
    guide = guide_fn(x, t, *x0_estimate)
    return guide + scale * (good_fn(x, t, *x0_estimate) - guide)

  return denoise


def classifier_guidance(
  denoise_fn, log_prob_fn, schedule: NoiseSchedule, *, prediction: str, scale: float,
  max_timestep: int,
):  # fmt: skip
  """Wraps `denoise_fn(x, t)` so that its prediction follows ε̂ − s·σ_t·∇ log p(y | x_t):
  classifier guidance (Dhariwal & Nichol, 2021), for any prediction target.

  `log_prob_fn(x_t, t)` is a noise-aware classifier's log-probability (B,) of the attributes
  asked for. The shift is expressed in ε and converted to the target the network predicts, so
  DDIM and DPM-Solver++ sample from the guided model unchanged. Only steps with t ≤
  `max_timestep` are guided: at higher noise a classifier reads nothing, and its gradient there is
  noise that moves the layout.
  """

  def denoise(x, t, *x0_estimate):
    out = denoise_fn(x, t, *x0_estimate)
    grad = jax.grad(lambda x: jnp.sum(log_prob_fn(x, t)))(x)
    alpha, sigma = schedule.alpha_sigma(t, x)
    on = (t <= max_timestep).reshape(-1, *(1,) * (x.ndim - 1))
    eps_shift = jnp.where(on, -scale * sigma * grad, 0.0)
    if prediction == "eps":
      return out + eps_shift
    if prediction == "v":  # ε = σ·x_t + α·v
      return out + eps_shift / alpha
    if prediction == "x0":  # x̂_0 = (x_t − σ·ε)/α
      return out - sigma / alpha * eps_shift
    raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")

  return denoise
