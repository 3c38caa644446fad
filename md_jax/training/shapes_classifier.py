"""Stage `shapes_classifier`: the attribute classifier behind the `shapes` evaluator.

Trained on real `shapes` images with one cross-entropy per label key (summed), on the labels in
their canonical shape order (`shapes_scene.canonical_labels`: a caption may name either shape
first), it later scores generated images against the attributes their prompts asked for, and its
features give a Fréchet distance between generated and real images (no Inception weights can be
fetched here).
"""

import flax.struct
import jax
import jax.numpy as jnp
import optax

from md_jax.data.shapes_scene import LABEL_NAMES, canonical_labels
from md_jax.models.shapes_classifier import ShapesClassifier
from md_jax.training import optimizers
from md_jax.training.stage import Stage
from md_jax.training.train_state import TrainState


class ClassifierState(flax.struct.PyTreeNode):
  classifier: TrainState

  @property
  def step(self):
    return self.classifier.step


def attribute_accuracy(logits: dict, labels) -> dict:
  """{label key: share of the batch whose argmax is the (canonical) label}."""
  return {key: jnp.mean(jnp.argmax(v, -1) == labels[key]) for key, v in logits.items()}


def attribute_classifier_step(state: TrainState, labels, logits_fn) -> tuple[TrainState, dict]:
  """One step of a classifier of every label key: the sum of one cross-entropy per key.

  `logits_fn(params)` → {label key: logits}; `labels` are the canonical ids. Returns the updated
  state and the loss, accuracy (mean and per key) and gradient-norm metrics.
  """

  def loss_fn(params):
    logits = logits_fn(params)
    losses = [
      jnp.mean(optax.softmax_cross_entropy_with_integer_labels(v, labels[key]))
      for key, v in logits.items()
    ]
    return sum(losses), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  accuracy = attribute_accuracy(logits, labels)
  metrics = {
    "loss": loss,
    "accuracy": jnp.mean(jnp.stack(list(accuracy.values()))),
    **{f"accuracy/{k}": v for k, v in accuracy.items()},
    "grad_norm": optax.global_norm(grads),
  }
  return state.apply_gradients(grads), metrics


def require_every_label(config) -> None:
  """A classifier of every attribute needs every label key from the input pipeline."""
  missing = set(LABEL_NAMES) - set(config.data.label_keys)
  if missing:
    raise ValueError(f"config.data.label_keys lacks {sorted(missing)} (the classifier needs all)")


class ShapesClassifierStage(Stage):
  def __init__(self, config):
    self.config = config
    require_every_label(config)
    self.model = ShapesClassifier.from_config(config)
    self.tx = optimizers.create_optimizer(config.optimizer)

  def init_state(self, rng) -> ClassifierState:
    res = self.config.data.resolution
    params = self.model.init(jax.random.wrap_key_data(rng), jnp.zeros((1, res, res, 3)))["params"]
    state = TrainState.create(params=params, tx=self.tx, rng=rng, ema_decay=self.config.ema_decay)
    return ClassifierState(classifier=state)

  def train_step(self, state: ClassifierState, batch):
    labels = canonical_labels({key: batch[key] for key in LABEL_NAMES})
    logits_fn = lambda params: self.model.apply({"params": params}, batch["image"])[0]
    classifier, metrics = attribute_classifier_step(state.classifier, labels, logits_fn)
    return state.replace(classifier=classifier), metrics
