"""The main job: what the README's first command runs on a fresh machine.

    python -m md_jax.main --config=configs/main.py --workdir=workdirs/main        # ≤ 60 min, 2 CPUs
    python -m md_jax.main --config=configs/main.py:quick --workdir=/tmp/main      # minutes, for CI

Builds the embedded `shapes` dataset (on first use) and trains the whole system on it, each stage
in `<workdir>/<stage>` (`md_jax/main_job.py`): the f=4, c=8 VAE → its light decoder → a
noise-aware attribute classifier on its latents (the guide) → latent diffusion with the 3-level
tiny UNet, progressive 32 → 64 px, on the light decoder's latents → the one-step UFOGen
generator finetuned from it → the attribute classifier the evaluator scores with; then a sample
grid, and attribute accuracy and Fréchet distance on held-out captions for 50-step DDIM + CFG,
the same with classifier guidance, and UFOGen's one step, side by side.
Each stage is its own config file at CPU scale; this file says only what the job changes, so
`--config.stages.diffusion.progressive.steps='(3000,500)'` tunes one stage from the command line.
Rerunning the command skips finished stages and resumes the one that was interrupted.

Text encoder: no pretrained CLIP can be downloaded here, so the CLIP-architecture encoder starts
random. It is trained jointly with the UNet (`text_encoder.train`): on this job's diffusion budget
(same VAE, data, seed, steps), 50-step DDIM + CFG reached 0.538 attribute accuracy with it trained
jointly against 0.468 with it frozen (background 0.98 vs 0.74, colour 0.66 vs 0.50; Fréchet
distance 921 vs 1032; BENCHMARKS.md). With real CLIP weights (`text_encoder.path`), keep it
frozen, as the paper does.

Diffusion recipe: v-prediction and `model.pooled_text` (the caption's mean token added to the
time embedding) instead of the paper's ε and cross-attention only: on this budget 50-step accuracy
0.538 → 0.591 and UFOGen's one step 0.342 → 0.538 (BENCHMARKS.md has the ablation). Then the
3-level tiny UNet with most images at 64 px, on two CPU devices: 0.591 → 0.700 and one step
0.538 → 0.665, the whole job in 56.5 min on an idle 2-core machine. Then cross-attention at the
16×16 level and a cosine lr decay, with G finetuned at a lower lr for longer: 0.703 → 0.804 and one
step 0.712 → 0.761 (Fréchet 1.14× the teacher's), the job in 33.9 min on a 2-core AMD EPYC
and 58.8 min on a 2-core Intel Xeon about 2× slower, where the same seed gives 0.763 (XLA:CPU's
numerics differ between processors; BENCHMARKS.md, session 12).
Then full ResNet blocks at the inner two levels instead of separable ones: 0.766 → 0.865 on
one machine and seed, one step 0.811 (Fréchet 1.28× the teacher's); the whole job took 72.6 min
on a slower 2-core AMD EPYC, over the 60-minute budget there (BENCHMARKS.md, session 15), and
48.3 min on a faster one of the same kind, where the same seed gives 0.822 (session 19).
Then the VAE's decoder trained on noised latents as well (`vae.latent_noise`): on that VM
0.822 → 0.853 and one step 0.770 → 0.824 (Fréchet 1.08× the teacher's; session 20).

Classifier guidance: through sessions 5–20 no change to the UNet's training taught it the kinds
from the caption (kind 0 stayed at 0.31–0.38 of four). The job therefore also trains a
noise-aware classifier of every caption attribute on the same latents (`latent_classifier`), and
its 50-step sampler adds −30·σ_t·∇ log p(attributes | x_t) to CFG's noise estimate for t ≤ 799
(Dhariwal & Nichol, 2021). The whole job, idle on a 2-core AMD EPYC, took 57.7 min: 50-step
accuracy 0.853 unguided → 0.905 guided (kind 0 0.36 → 0.52, colour 0 0.89 → 0.94, Fréchet
distance 416 → 357), one step 0.824 (BENCHMARKS.md, session 21). The guide reads the dataset's
labels, so it serves `shapes`-grammar prompts only; `eval.json` keeps the unguided figure beside it.
The same classifier also trains UFOGen's G, by its cross-entropy of the caption's attributes on
the fakes D sees: on one teacher and VM, one step 0.824 → 0.855 (BENCHMARKS.md, session 22).

Representation alignment: the same classifier's map of the clean latent is also the target of a
REPA loss on the UNet's middle (`_diffusion`). The first recipe change to teach the UNet the
kinds without costing the colours. The whole job, idle on the same 2-core AMD EPYC, took 57.4 min
(about 57.7 with building `shapes`): 50-step accuracy 0.853 → 0.937 unguided (kind 0 0.36 → 0.68,
colour 0 0.89 → 0.97, Fréchet 416 → 272), 0.939 guided, and one step 0.855 → 0.930
(BENCHMARKS.md, sessions 27 and 28).
"""

import ml_collections

from md_jax.config_utils import load_config
from md_jax.data.shapes_scene import LABEL_NAMES
from md_jax.training.ufogen import inherit_from_diffusion

PROMPTS = (  # captions in the dataset's grammar (md_jax/data/shapes_scene.py)
  "a large red circle in the center on a white background",
  "a small blue square on the left on a black background",
  "a large green triangle at the top on a gray background",
  "a small yellow circle left of a large purple square on a white background",
  "a large orange star above a small cyan circle on a beige background",
  "a small pink square at the bottom on a gray background",
  "a large blue star on the right on a white background",
  "a small red triangle below a large green circle on a black background",
)


def _vae(arg):
  """The f=4, c=8 autoencoder at CPU scale: 64 px → 16×16×8 latents."""
  config = load_config("vae.py:tiny", relative_to=__file__)
  model = config.model
  model.num_groups = 4
  model.encoder.channels, model.encoder.channel_mult = 16, (1, 2, 4)
  model.decoder.channels, model.decoder.channel_mult = 16, (1, 2, 4)
  model.encoder.mid_attention = model.decoder.mid_attention = False
  model.light_decoder.channels, model.light_decoder.channel_mult = 8, (1, 2, 4)
  config.num_train_steps = 6 if arg == "quick" else 1200
  config.gan.start_step = config.num_train_steps * 2 // 3
  config.optimizer.lr = 1e-3
  # The decoder also reconstructs from noised latents (l-DeTok; `training/vae.py`), so the kind
  # survives noise in x_t: a probe reads it at t = 300 at 0.98 instead of 0.57. On one VM and seed,
  # 50-step accuracy 0.822 → 0.853 and one step 0.770 → 0.824 (colour and size; the kinds stay
  # at 0.36; BENCHMARKS.md, session 20).
  config.latent_noise = 1.0
  config.checkpoint_every = config.sample_every = 400
  return config


def _decoder_distill(arg):
  config = load_config("decoder_distill.py:tiny", relative_to=__file__)
  config.model = _vae(arg).model
  config.optimizer.lr = 1e-3
  config.num_train_steps = 4 if arg == "quick" else 500
  config.init_checkpoint = "{workdir}/vae"
  config.checkpoint_every = config.sample_every = 500
  return config


def _diffusion(arg):
  config = load_config("diffusion.py:tiny", relative_to=__file__)
  config.latents.kind = "vae"
  config.latents.checkpoint = "{workdir}/decoder_distill"  # the light decoder's run
  config.text_encoder.train = True  # see the module docstring
  # Measured on this budget (module docstring, BENCHMARKS.md): v-prediction (its loss keeps
  # weight at high noise, where the layout is decided; UFOGen's one step reads x0 from v without
  # dividing by √ᾱ_T) and the caption pooled into the time embedding. The schedule stays SD's.
  config.prediction = "v"
  config.model = load_config("models/tiny.py:three_levels", relative_to=__file__)
  config.model.text_dim = config.text_encoder.hidden_size
  config.model.pooled_text = True
  # Full ResNet blocks at every level instead of the paper's separable ones at the inner two
  # (1.6M → 2.5M params): the same seed and machine give 50-step accuracy 0.766 → 0.865 (colour
  # 0.80 → 0.98, placement 0.87 → 1.00) for 6% more time per 64 px step, since XLA:CPU's depthwise
  # convs are memory-bound (BENCHMARKS.md, session 15). The paper's separable blocks save phone
  # FLOPs; `configs/models/mobilediffusion.py` keeps them.
  config.model.block_types = ("resnet", "resnet", "resnet")
  # Cross-attention at the 16×16 level too (the 64 px phase's full latent resolution), both ways
  # down and up: on this budget 50-step accuracy 0.703 → 0.789 (placement 0.82 → 0.96), one step
  # 0.712 → 0.770, for ~20% more time per 64 px step (BENCHMARKS.md, session 9).
  config.model.down_transformer_depths = ((1,), (1,), (1,))
  config.model.up_transformer_depths = ((1, 1), (1, 1), (1, 1))
  # quick: the 64 px phase is left empty (its step would be one more program to compile); the
  # phase switch is tested in tests/test_trainer.py. Later stages still work at 64 px.
  # Most of the images at 64 px, where a small shape's outline (its kind) is 3.5 latent pixels
  # wide; at 32 px it is under 2 and only colours, sizes and places can be learned.
  config.progressive.steps = (10, 0) if arg == "quick" else (2000, 2500)
  # Representation alignment (REPA; `md_jax/training/representation_alignment.py`): in both
  # phases the UNet's middle, through a 64-wide head, is pulled toward the latent classifier's map
  # of the clean latent. Unlike a classifier loss on x̂_0 (0.829, the colours lost), the output
  # path is left to the denoising loss: on one VM and set of stages, 50-step accuracy
  # 0.853 → 0.937 (kind 0 0.36 → 0.68, colour 0 0.89 → 0.97, Fréchet 416 → 272); in the 64 px
  # phase alone 0.880. 3% more time per 64 px step (BENCHMARKS.md, session 27).
  config.model.representation_dim = 64  # the latent classifier's last width (checked)
  config.representation_alignment.update(
    checkpoint="{workdir}/latent_classifier", weight=2.0, every_phase=True
  )
  config.progressive.batch_sizes = (32, 32)
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 100
  # Cosine decay to zero at the last step, across both phases: on this budget 50-step accuracy
  # 0.703 → 0.747 and Fréchet distance 549 → 488 against a constant lr (BENCHMARKS.md, session 9).
  config.optimizer.decay = "cosine"
  config.optimizer.decay_steps = sum(config.progressive.steps)
  config.ema_decay = 0.995
  config.checkpoint_every = 500
  config.max_checkpoints_to_keep = 8  # every 500 steps kept: accuracy over training is evaluable
  config.sample_every = 0
  return config


def _ufogen(arg):
  """One-step G from the diffusion run (paper Sec. 4): full finetuning, diffusion loss."""
  config = load_config("ufogen.py:tiny", relative_to=__file__)
  config = inherit_from_diffusion(config, _diffusion(arg))
  config.init_checkpoint = "{workdir}/diffusion"
  # At UFOGen's jump of T/4 D never leaves chance on this budget: G's x0' is blurry only at large
  # t, where x_{t'} is mostly noise. With t' = t − 750, D sees G's x0' of t ≥ 750 (the one-step
  # regime) at t' < 250 and learns within 100 steps (`benchmarks/discriminator_probe`).
  config.ufogen.jump = 750
  config.ufogen.discriminator.optimizer.lr = 1e-3
  # G at 3e-5 for 800 steps: from the cosine-annealed teacher, G at 1e-4 for 400 steps undid part
  # of the annealing (one step 0.673, Fréchet 1.53× the teacher's); 3e-5: 1.34×; 800 steps: 1.23×.
  config.optimizer.lr = 3e-5
  config.global_batch_size = 16
  # The guide's cross-entropy of the caption's attributes on the fake x'_{t'} that D sees (AC-GAN
  # style, `training/ufogen.py`), at weight 2: on one teacher and VM, one step 0.824 → 0.855
  # (colour and size; the kinds 0.33 → 0.36), Fréchet distance 450 → 452 (BENCHMARKS.md, session
  # 22). Weights 0.1, 0.5 and 5 gave 0.844, 0.850 and 0.856 (Fréchet 462 at 5).
  config.data.label_keys = tuple(LABEL_NAMES)
  config.ufogen.classifier.update(checkpoint="{workdir}/latent_classifier", weight=2.0)
  config.num_train_steps = 3 if arg == "quick" else 800
  config.checkpoint_every = config.sample_every = 400
  return config


def _latent_classifier(arg):
  """The noise-aware attribute classifier whose gradient guides the 50-step sampler."""
  config = load_config("latent_classifier.py", relative_to=__file__)
  diffusion = _diffusion(arg)
  config.latents, config.schedule = diffusion.latents, diffusion.schedule
  # Half the default widths: guidance as good (0.909 against 0.907 on one teacher), the step
  # 0.16 s instead of 0.23, and guided sampling faster (BENCHMARKS.md, session 21). 3000 steps:
  # at 1500 the kinds reach only 0.42 (0.892 overall).
  config.model.channels = (16, 32, 64)
  # 32 images, each noised twice: the VAE encoder and the input pipeline cost most of a step.
  config.global_batch_size, config.noise_draws = 32, 2
  config.num_train_steps = config.optimizer.decay_steps = 3 if arg == "quick" else 3000
  config.checkpoint_every = 1000
  return config


def _shapes_classifier(arg):
  config = load_config("shapes_classifier.py", relative_to=__file__)
  config.model.channels = (16, 32, 64, 64)
  config.optimizer.lr = 2e-3
  config.num_train_steps = 5 if arg == "quick" else 1000
  return config


def get_config(arg=None):
  if arg not in (None, "quick"):
    raise ValueError(f"configs/main.py: unknown variant {arg!r} (known: quick)")
  config = ml_collections.ConfigDict()
  config.stage = "main"
  config.seed = 0
  # Two XLA devices on a 2-core CPU host, each stage's batch split over them: the diffusion
  # step (VAE encoder + UNet) ran 1.4x faster than on one device (BENCHMARKS.md). No effect
  # on accelerators.
  config.cpu_devices = 2
  config.order = (
    "vae",
    "decoder_distill",
    "latent_classifier",
    "diffusion",
    "ufogen",
    "shapes_classifier",
  )
  config.stages = ml_collections.ConfigDict(
    {
      "vae": _vae(arg),
      "decoder_distill": _decoder_distill(arg),
      "diffusion": _diffusion(arg),
      "ufogen": _ufogen(arg),
      "latent_classifier": _latent_classifier(arg),
      "shapes_classifier": _shapes_classifier(arg),
    }
  )
  # Classifier guidance toward every captioned attribute by the `latent_classifier` stage's
  # classifier, on top of CFG (module docstring).
  guidance = {"latent_classifier": "latent_classifier", "classifier_scale": 30.0}
  config.samples = ml_collections.ConfigDict(
    {"checkpoint": "diffusion", "prompts": PROMPTS, "sampler": "ddim", "steps": 50, "cfg": 3.0,
     **guidance}
  )  # fmt: skip
  if arg == "quick":
    config.samples.steps = 2
  config.evaluator = "shapes_classifier"  # the stage whose classifier scores the images
  config.eval_images = 64 if arg == "quick" else 512
  # Paper Sec. 5.2: DDIM, CFG ≈ 3. Later stages add their one-step evaluation beside this one.
  ddim = {"checkpoint": "diffusion", "sampler": "ddim", "steps": 2 if arg == "quick" else 50}
  one_step = {"checkpoint": "ufogen", "sampler": "ufogen", "steps": 1, "cfg": 1.0}
  config.evaluations = ml_collections.ConfigDict(
    {"diffusion": {**ddim, "cfg": 3.0}, "diffusion_guided": {**ddim, "cfg": 3.0, **guidance},
     "ufogen": one_step}
  )  # fmt: skip
  return config
