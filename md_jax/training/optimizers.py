"""Optimizers from config: AdamW with warmup, decay and global-norm clipping (paper Sec. 5.1).

Both functions take an optimizer sub-config (`config.optimizer`, or e.g. `config.gan.optimizer` for
a discriminator), so every trained network of a stage is configured the same way.
"""

import optax


def learning_rate_schedule(opt):
  """`opt`: lr, warmup_steps, decay ("constant" | "cosine"), decay_steps."""
  warmup = optax.linear_schedule(0.0, opt.lr, max(1, opt.warmup_steps))
  if opt.get("decay", "constant") == "constant":
    after = optax.constant_schedule(opt.lr)
  elif opt.decay == "cosine":
    after = optax.cosine_decay_schedule(opt.lr, max(1, opt.decay_steps - opt.warmup_steps))
  else:
    raise ValueError(f"optimizer.decay={opt.decay!r}: expected 'constant' or 'cosine'")
  return optax.join_schedules([warmup, after], [opt.warmup_steps])


def create_optimizer(opt) -> optax.GradientTransformation:
  """AdamW (lr 1e-3, β1 0.9, β2 0.999, weight decay 0.01 in the paper) after grad clipping."""
  if opt.name == "adamw":
    base = optax.adamw(
      learning_rate_schedule(opt),
      b1=opt.b1,
      b2=opt.b2,
      eps=opt.get("eps", 1e-8),
      weight_decay=opt.weight_decay,
    )
  elif opt.name == "adam":
    base = optax.adam(learning_rate_schedule(opt), b1=opt.b1, b2=opt.b2, eps=opt.get("eps", 1e-8))
  else:
    raise ValueError(f"optimizer.name={opt.name!r}: expected 'adamw' or 'adam'")
  if opt.get("grad_clip", 0) > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), base)
  return base
