"""GAN losses shared by the VAE stage (PatchGAN) and UFOGen: hinge or non-saturating, and the
adaptive generator weight of taming-transformers (Esser et al., 2021, Eq. 7)."""

import jax
import jax.numpy as jnp

LOSS_KINDS = ("hinge", "non_saturating")


def _check(kind: str):
  if kind not in LOSS_KINDS:
    raise ValueError(f"gan loss {kind!r}: expected one of {LOSS_KINDS}")


def discriminator_loss(real_logits, fake_logits, kind: str):
  """D's loss: real pushed up, fake down (means over every patch logit)."""
  _check(kind)
  if kind == "hinge":
    return 0.5 * (
      jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))
    )
  return 0.5 * (jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits)))


def generator_loss(fake_logits, kind: str):
  """G's loss: −E[D(fake)] for hinge (as taming), E[softplus(−D(fake))] non-saturating."""
  _check(kind)
  if kind == "hinge":
    return -jnp.mean(fake_logits)
  return jnp.mean(jax.nn.softplus(-fake_logits))


def adaptive_weight(reconstruction_grad, adversarial_grad, max_weight: float = 1e4):
  """‖∇_L rec‖ / (‖∇_L adv‖ + 1e-4) at the generator's last layer L, clipped and not trained.

  Balances the two terms so the adversarial gradient never dwarfs the reconstruction one,
  whatever the scale of D's logits.
  """
  weight = jnp.linalg.norm(reconstruction_grad) / (jnp.linalg.norm(adversarial_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))
