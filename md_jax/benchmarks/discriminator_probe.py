r"""Can UFOGen's discriminator tell real x_{t'} from the generator's, and at which noise levels?

  python -m md_jax.benchmarks.discriminator_probe --workdir=workdirs/main [--jump=750] \
      [--steps=300] [--lr=1e-3] [--body_lr_scale=0.1]

Trains D alone, exactly as the main job's `ufogen` stage would (`configs/main.py`'s stage config,
its optimizer and GAN loss, D's body from `<workdir>/diffusion`), against a generator frozen at its
starting point: the diffusion run's UNet. Every `--eval_every` steps it scores D on fixed held-out
batches: the fraction of (real, fake) pairs of one caption and t' in which the real one gets the
higher logit (0.5 is chance), per t' bucket, and the mean logit gap. A D that cannot learn this
frozen target gives G no adversarial signal in the joint run either. The last line is one JSON
object.
"""

import json
import pathlib
import time

from absl import app, flags

from md_jax.benchmarks import timing

_REPO = pathlib.Path(__file__).resolve().parents[2]
_BUCKET = 250  # t' buckets of this many timesteps


def define_flags():
  flags.DEFINE_string("workdir", None, "The main job's workdir (its diffusion run).")
  flags.DEFINE_integer("jump", None, "t − t' (default: the job's ufogen.jump).")
  flags.DEFINE_integer("steps", 300, "D steps.")
  flags.DEFINE_float("lr", None, "D's lr (default: the job's).")
  flags.DEFINE_float("body_lr_scale", None, "D body's lr / D's lr (default: the job's).")
  flags.DEFINE_integer("eval_every", 50, "Steps between held-out scores.")
  flags.DEFINE_integer("eval_batches", 8, "Held-out batches scored.")
  flags.mark_flag_as_required("workdir")


def probe_config(workdir: pathlib.Path, jump=None, lr=None, body_lr_scale=None):
  from md_jax.config_utils import load_config
  from md_jax.main_job import resolve_workdir

  config = resolve_workdir(load_config(_REPO / "configs/main.py").stages.ufogen, workdir)
  config.ufogen.classifier.weight = 0.0  # the probe trains D alone: G's classifier term is idle
  d = config.ufogen.discriminator
  if jump is not None:
    config.ufogen.jump = jump
  if lr is not None:
    d.optimizer.lr = lr
  if body_lr_scale is not None:
    d.body_lr_scale = body_lr_scale
  return config


def pair_accuracy(real_logits, fake_logits, t_prev, num_steps: int) -> dict:
  """Per t' bucket, the fraction of pairs whose real logit is above the fake one (a tie: ½)."""
  import numpy as np

  real, fake = np.asarray(real_logits), np.asarray(fake_logits)
  wins = (real > fake) + 0.5 * (real == fake)
  bucket = np.asarray(t_prev) // _BUCKET
  return {
    f"t'_{b * _BUCKET}-{min((b + 1) * _BUCKET, num_steps) - 1}": float(np.mean(wins[bucket == b]))
    for b in sorted(set(bucket.tolist()))
  }


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  import numpy as np

  from md_jax.data import pipeline
  from md_jax.infra import checkpoints, sharding
  from md_jax.training.ufogen import UFOGenStage

  FLAGS = flags.FLAGS
  config = probe_config(pathlib.Path(FLAGS.workdir), FLAGS.jump, FLAGS.lr, FLAGS.body_lr_scale)
  stage = UFOGenStage(config)
  state = nn.meta.unbox(stage.init_state(jax.random.key_data(jax.random.key(config.seed))))
  state = stage.initialize_from(state, checkpoints.load_state_tree(config.init_checkpoint)[0])
  mesh = sharding.create_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.get("logical_axis_rules"))
  batches = pipeline.create_input_iterator(
    config.data, global_batch_size=config.global_batch_size, mesh=mesh, rules=rules
  )

  @jax.jit
  def make_pair(state, batch, rng):
    """A real and a fake x_{t'} per caption, the fake from the generator at its start (frozen)."""
    inputs = stage.noised_inputs(state, batch, rng)
    x0_pred = stage.predict_x0(state.unet.params, inputs["x_t"], inputs["t"], inputs["text"])
    fake = stage.schedule.add_noise(x0_pred, inputs["fake_noise"], inputs["t_prev"])
    return inputs["real_prev"], fake, inputs["t_prev"], inputs["text"]

  @jax.jit
  def train(d, real, fake, t_prev, text):
    grad_fn = jax.value_and_grad(stage.discriminator_loss, has_aux=True)
    (loss, _), grads = grad_fn(d.params, real, fake, t_prev, text)
    return d.apply_gradients(grads), loss

  scores = jax.jit(lambda params, *pair_: stage.discriminator_loss(params, *pair_)[1])
  held_out = [
    make_pair(state, next(batches), jax.random.key(10**6 + i)) for i in range(FLAGS.eval_batches)
  ]
  d, losses, history = state.discriminator, [], []
  start = time.perf_counter()
  for step in range(FLAGS.steps + 1):
    if step % FLAGS.eval_every == 0 or step == FLAGS.steps:
      logits = [scores(d.params, *p) for p in held_out]
      real = np.concatenate([r for r, _ in logits])
      fake = np.concatenate([f for _, f in logits])
      t_prev = np.concatenate([np.asarray(p[2]) for p in held_out])
      row = {
        "step": step,
        "train_loss": float(np.mean(losses[-FLAGS.eval_every :])) if losses else None,
        "pair_accuracy": pair_accuracy(real, fake, t_prev, stage.schedule.num_steps),
        "logit_gap": float(np.mean(real - fake)),
        "seconds": round(time.perf_counter() - start, 1),
      }
      history.append(row)
      print(json.dumps(row), flush=True)
    if step == FLAGS.steps:
      break
    d, loss = train(d, *make_pair(state, next(batches), jax.random.key(step)))
    losses.append(float(loss))
  batches.close()
  d_config = config.ufogen.discriminator
  print(
    json.dumps({
      **timing.machine(),
      "jump": config.ufogen.jump,
      "lr": d_config.optimizer.lr,
      "body_lr_scale": d_config.body_lr_scale,
      "adam_b1_b2": [d_config.optimizer.b1, d_config.optimizer.b2],
      "batch": config.global_batch_size,
      "history": history,
    })
  )  # fmt: skip


if __name__ == "__main__":
  define_flags()
  app.run(main)
