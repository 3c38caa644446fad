"""Stage `step_distill`: progressive distillation to few steps, guidance folded in.

Salimans & Ho (2022), Alg. 2, in discrete time: a student initialised from its teacher learns to
make in one DDIM step what the teacher makes in two. Round r's student samples in
N = `teacher_steps` / 2^(r+1) steps on the trailing grid (`samplers.trailing_timesteps`), whose
2N-point version, the teacher's, holds it at every other point. Per example, with i ~ U{0..N−1}:

    t = grid_N[i],  t_mid = grid_2N[2i+1],  t_next = grid_N[i+1] (−1: the clean end)
    z_t ~ q(z_t | x0);  z_mid, z_next: two deterministic DDIM steps of the teacher from z_t
    x̃ = (z_next − (σ_next/σ_t)·z_t) / (α_next − (σ_next/σ_t)·α_t)   (one DDIM step to z_next)
    L = max(SNR_t, 1) · ‖x̂_student(z_t) − x̃‖²                      ("truncated SNR" weighting)

Rounds are the trainer's phases: as each begins (`begin_phase`), the last round's student (its EMA)
becomes the teacher and the student's optimizer starts afresh; a resume lands in its round with
its teacher, which the checkpoint holds. Each round's last checkpoint is kept.

Guidance (`step_distill.mode`):
  * "embedded" (Meng et al., 2023, "On Distillation of Guided Diffusion Models"): the teacher's
    steps use classifier-free guidance at a scale w ~ U[`guidance_range`] per example, and the
    student, a guidance-conditioned UNet (`model.guidance_embedding`), takes w as input: one call
    per sampling step instead of two. From round 1 the teacher is such a student itself.
  * "cfg_aware" (SnapFusion, Li et al., 2023, Sec. 4.2): the student stays a plain UNet; per
    example, with probability `cfg_aware_probability` both teacher and student are read through
    CFG at w (the student's two calls differentiated), otherwise both unguided. It samples with
    CFG, two calls per step.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from md_jax.diffusion.samplers import trailing_timesteps
from md_jax.infra import checkpoints
from md_jax.infra.phases import phases_from_config
from md_jax.pipeline.checkpoint_layout import InferenceParams, trained_params
from md_jax.pipeline.text_to_image import TextToImage
from md_jax.training import optimizers
from md_jax.training.stage import Stage
from md_jax.training.train_state import TrainState

MODES = ("embedded", "cfg_aware")


class StepDistillState(flax.struct.PyTreeNode):
  unet: TrainState  # the student: where every diffusion-family checkpoint keeps the sampled UNet
  teacher: Any  # this round's teacher's UNet params, in the student's structure (frozen)
  text_encoder: Any  # frozen params
  autoencoder: Any  # frozen params
  round: jax.Array  # int32: the round (phase) the teacher and student belong to
  student_steps: jax.Array  # int32: N, the student's sampling steps this round

  @property
  def step(self):
    return self.unet.step

  def inference_params(self) -> InferenceParams:
    return InferenceParams(self.unet.ema_params, self.text_encoder, self.autoencoder)


def _alpha_sigma_to(schedule, t_next, like):
  """√ᾱ and √(1−ᾱ) at `t_next`, shaped to broadcast against `like`; t_next = −1 is the clean end
  (1, 0), which the trailing grid's last step reaches."""
  abar = jnp.where(t_next >= 0, schedule.alphas_cumprod[jnp.maximum(t_next, 0)], 1.0)
  abar = abar.reshape(-1, *(1,) * (like.ndim - 1))
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def ddim_step(schedule, z, x0, eps, t_next):
  """A deterministic DDIM step from (x̂_0, ε̂) to `t_next` (−1: the clean end, where it is x̂_0)."""
  alpha_next, sigma_next = _alpha_sigma_to(schedule, t_next, z)
  return alpha_next * x0 + sigma_next * eps


def one_step_target(schedule, z_t, t, z_next, t_next):
  """x̃: the x̂_0 with which one DDIM step from z_t at t lands on z_next at t_next."""
  alpha_t, sigma_t = schedule.alpha_sigma(t, z_t)
  alpha_next, sigma_next = _alpha_sigma_to(schedule, t_next, z_t)
  ratio = sigma_next / sigma_t
  return (z_next - ratio * z_t) / (alpha_next - ratio * alpha_t)


class StepDistillStage(Stage):
  starts_from = ("diffusion", "relu_finetune")
  needs_init_checkpoint = "the diffusion run to distil (its workdir or a checkpoint)"
  keeps_phase_checkpoints = True

  def __init__(self, config, tokenizer=None):
    sd = config.step_distill
    if sd.mode not in MODES:
      raise ValueError(f"config.step_distill.mode={sd.mode!r}: expected one of {MODES}")
    if bool(config.model.get("guidance_embedding", False)) != (sd.mode == "embedded"):
      raise ValueError(
        f"config.model.guidance_embedding={config.model.get('guidance_embedding', False)}: "
        f"mode {sd.mode!r} needs it {sd.mode == 'embedded'} (the student takes w as input "
        "only when guidance is embedded)"
      )
    rounds = len(phases_from_config(config))
    if sd.teacher_steps % 2**rounds or sd.teacher_steps < 2**rounds:
      raise ValueError(
        f"config.step_distill.teacher_steps={sd.teacher_steps}: {rounds} rounds halve it "
        f"{rounds} times, so it must be a multiple of {2**rounds}"
      )
    low, high = sd.guidance_range
    if not 0.0 <= low <= high:
      raise ValueError(
        f"config.step_distill.guidance_range={tuple(sd.guidance_range)}: need 0 ≤ low ≤ high"
      )
    if config.get("timestep_spacing", "linspace") != "trailing":
      raise ValueError(
        "config.timestep_spacing must be 'trailing': the student's N steps are the trailing "
        "grid's jumps it is trained on"
      )
    self.config = config
    self.pipeline = TextToImage.from_config(config, tokenizer=tokenizer)
    self.unet = self.pipeline.unet
    self.schedule = self.pipeline.schedule
    self.prediction = self.pipeline.prediction
    if self.prediction == "eps":
      # The student keeps its teacher's parameterisation; read from ε, x̂_0 = (z − σ·ε̂)/α divides
      # by α ≈ 0 near T, which is why Salimans & Ho distil v-prediction models (their Sec. 4).
      logging.warning(
        "config.prediction='eps': step distillation reads x̂_0 through 1/α_t, ill-conditioned "
        "at the first steps; a v-prediction teacher distils better (Salimans & Ho, 2022)"
      )
    self.tx = optimizers.create_optimizer(config.optimizer)
    self.embedded = sd.mode == "embedded"

  # --- Stage hooks ------------------------------------------------------------------------

  def init_state(self, rng) -> StepDistillState:
    key = jax.random.wrap_key_data(rng)
    res = self.config.data.resolution
    # The teacher's shapes, where `initialize_from` puts in the trained values; drawn as the
    # diffusion stage draws them only when a guidance embedding, new in the student, keeps its
    # init.
    if self.pipeline.unet.guidance_embedding:
      params = self.pipeline.init_params(jax.random.split(key, 4)[:3], res)
    else:
      params = self.pipeline.placeholder_params(res)
    return StepDistillState(
      unet=TrainState.create(
        params=params.unet, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay
      ),
      teacher=jax.tree.map(lambda p: p, params.unet),
      text_encoder=params.text_encoder,
      autoencoder=params.autoencoder,
      round=jnp.zeros((), jnp.int32),
      student_steps=jnp.full((), self.config.step_distill.teacher_steps // 2, jnp.int32),
    )

  def initialize_from(self, state: StepDistillState, source) -> StepDistillState:
    """Student and teacher from the diffusion run's UNet (its EMA): a guidance embedding, absent
    there, keeps its init, whose zero last layer leaves the UNet the teacher's for every w."""
    unet = source["unet"]["ema_params" if self.config.get("init_from_ema", True) else "params"]
    # Only the guidance embedding may be new: every other leaf is the teacher's (strict: one
    # missing or misshapen is an error naming it).
    template = dict(state.unet.params)
    guidance = template.pop("guidance_embed", None)
    params = checkpoints.copy_into(unet, template)
    if guidance is not None:
      params["guidance_embed"] = jax.tree.map(np.array, guidance)
    return state.replace(
      unet=state.unet.replace(params=params, ema_params=params, opt_state=self.tx.init(params)),
      teacher=params,
      text_encoder=checkpoints.copy_into(
        trained_params(source["text_encoder"]), state.text_encoder
      ),
      autoencoder=checkpoints.copy_into(source["autoencoder"], state.autoencoder),
    )

  def begin_phase(self, state: StepDistillState, phase_index: int):
    """Round `phase_index`: the previous round's student (EMA) teaches, the student goes on
    from it with a fresh optimizer, and takes half the steps."""
    done = int(jax.device_get(state.round))
    if done == phase_index:
      return state
    if done != phase_index - 1:
      raise ValueError(f"step distillation: the state is in round {done}, not {phase_index - 1}")
    student = state.unet.ema_params
    return state.replace(
      unet=state.unet.replace(params=student, ema_params=student, opt_state=self.tx.init(student)),
      teacher=student,
      round=state.round + 1,
      student_steps=state.student_steps // 2,
    )

  def guided_x0_eps(self, unet_params, z, t, text, null, w, *, folded):
    """(x̂_0, ε̂) of the UNet guided at scale w (B,): one call of a guidance-conditioned UNet
    (`folded`), or classifier-free guidance's two (cond and uncond as one batch)."""
    if folded:
      out = self.unet.apply({"params": unet_params}, z, t, text, guidance=w)
    else:
      guidance = {"guidance": jnp.ones((2 * z.shape[0],))} if self.embedded else {}
      both = self.unet.apply(
        {"params": unet_params}, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
        jnp.concatenate([text, null]), **guidance,
      )  # fmt: skip
      cond, uncond = jnp.split(both, 2)
      out = uncond + w.reshape(-1, 1, 1, 1) * (cond - uncond)
    return self.schedule.to_x0_and_eps(out, z, t, self.prediction)

  def loss(self, student_params, state: StepDistillState, batch):
    sd = self.config.step_distill
    pipeline, schedule = self.pipeline, self.schedule
    k_i, k_noise, k_w, k_mix = jax.random.split(state.unet.step_rng(), 4)
    text = pipeline.encode_text(state.text_encoder, batch["tokens"])
    x0 = pipeline.latent_space.encode(state.autoencoder, batch["image"])
    batch_size = x0.shape[0]
    null = pipeline.null_text(state.teacher, state.text_encoder, batch_size)
    n = state.student_steps
    length = schedule.num_steps
    i = jax.random.randint(k_i, (batch_size,), 0, n)
    t = trailing_timesteps(length, n, i)
    t_mid = trailing_timesteps(length, 2 * n, 2 * i + 1)
    t_next = trailing_timesteps(length, n, i + 1)
    z_t = schedule.add_noise(x0, jax.random.normal(k_noise, x0.shape), t)
    w = jax.random.uniform(k_w, (batch_size,), minval=sd.guidance_range[0],
                           maxval=sd.guidance_range[1])  # fmt: skip
    if not self.embedded:  # SnapFusion's mix: CFG at w for some examples, none (w = 1) for others
      guided = jax.random.bernoulli(k_mix, sd.cfg_aware_probability, (batch_size,))
      w = jnp.where(guided, w, 1.0)

    def teach(z, t_from, t_to):
      def two_calls(_):
        return self.guided_x0_eps(state.teacher, z, t_from, text, null, w, folded=False)

      def one_call(_):
        return self.guided_x0_eps(state.teacher, z, t_from, text, null, w, folded=True)

      if self.embedded:  # round 0's teacher is the diffusion UNet, later ones are students
        x0_hat, eps_hat = jax.lax.cond(state.round == 0, two_calls, one_call, None)
      else:
        x0_hat, eps_hat = two_calls(None)
      return ddim_step(schedule, z, x0_hat, eps_hat, t_to)

    z_mid = teach(z_t, t, t_mid)
    z_next = teach(z_mid, t_mid, t_next)
    target = jax.lax.stop_gradient(one_step_target(schedule, z_t, t, z_next, t_next))
    x0_student, _ = self.guided_x0_eps(student_params, z_t, t, text, null, w, folded=self.embedded)
    weight = jnp.maximum(schedule.snr(t), 1.0)  # Salimans & Ho's "truncated SNR"
    per_example = jnp.mean(jnp.square(x0_student - target), axis=(1, 2, 3))
    return jnp.mean(weight * per_example), {"student_steps": n.astype(jnp.float32)}

  def train_step(self, state: StepDistillState, batch):
    (loss, terms), grads = jax.value_and_grad(self.loss, has_aux=True)(
      state.unet.params, state, batch
    )
    metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads)}
    return state.replace(unet=state.unet.apply_gradients(grads)), metrics

  def text_to_image(self, state: StepDistillState):
    return self.pipeline, state.inference_params()

  def sample_images(self, state: StepDistillState, batch, num: int = 8):
    """The student's samples in this round's steps (EMA params, guidance at `sample_cfg`)."""
    return self.pipeline.generate(
      state.inference_params(),
      batch["tokens"][:num],
      seed=jax.random.key(self.config.seed),
      resolution=batch["image"].shape[1],
      steps=int(jax.device_get(state.student_steps)),
      cfg=self.config.sample_cfg,
    )
