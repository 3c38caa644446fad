"""The main job: what the README's first command runs on a fresh machine.

    python -m md_jax.main --config=configs/main.py --workdir=workdirs/main        # ~1.6 h, 2 CPUs
    python -m md_jax.main --config=configs/main.py:quick --workdir=/tmp/main      # minutes, for CI
    python -m md_jax.main --config=configs/main.py:relu --workdir=workdirs/relu   # G from relu

Builds the embedded `shapes` dataset (on first use) and trains the whole system on it, each stage
in `<workdir>/<stage>` (`md_jax/main_job.py`): the f=4, c=8 VAE → its light decoder → a
noise-aware attribute classifier on its latents (the guide) → latent diffusion with the 3-level
tiny UNet, progressive 32 → 64 px, on the light decoder's latents → its attention finetuned from
softmax into relu (paper Sec. 3.2) → the softmax model progressively distilled to 8 steps → the
one-step UFOGen generator finetuned from the softmax model (from the relu one with the `relu`
variant) → the attribute classifier the evaluator scores with → the applications of paper
Sec. 5.4 trained on the diffusion run only (a canny control plugin, a DreamBooth LoRA, an
inpainting plugin); then a sample grid, and attribute
accuracy and Fréchet distance on held-out captions for 50-step DDIM + CFG (softmax and relu), the
same with classifier guidance, the distilled student's 8 steps and UFOGen's one step, side by
side; then the one-step model exported for phones (`<workdir>/export`) and each artifact (LiteRT
fp32, fp16, int8; IREE) scored the same way; last, the applications with the 50-step teacher and
the one-step generator (`eval.json`'s "applications", `<workdir>/applications.png`).
Each stage is its own config file at CPU scale; this file says only what the job changes, so
`--config.stages.diffusion.progressive.steps='(3000,500)'` tunes one stage from the command line.
Rerunning the command skips finished stages and resumes the one that was interrupted.

Current result (session 41, 2-core Intel Xeon VM, the whole job at 240fe96): 0.924 attribute
accuracy with 50-step DDIM + CFG (0.949 with classifier guidance, 0.913 relu, 0.924 with the
8-step student, 0.928 with UFOGen's one step), in an estimated 95–100 min idle (its first four
stages 47 min idle; the rest shared the cores: BENCHMARKS.md, 'The job end to end at 240fe96').
Session 28 had 0.937 on a 2-core AMD EPYC VM, in 57.4 min. BENCHMARKS.md, 'Recipe history',
lists each change to this recipe with its figures.
"""

import ml_collections

from md_jax.config_utils import inherit_from_diffusion, load_config
from md_jax.data.shapes_scene import LABEL_NAMES

# Every image the job scores is drawn by the light decoder. At 500 steps it blurred the small
# shapes' corners and edges: the validation images round-tripped through it kept edge F1 0.53
# against their own edges (the full VAE decoder 0.89; 2500 steps 0.94), which capped the control
# and inpainting figures (BENCHMARKS.md, 'the job's light decoder caps both'). The latents do not
# change (the encoder is frozen), so no later stage depends on this count but through its images.
DECODER_DISTILL_STEPS = 2500
STEP_DISTILL_ROUND_STEPS = 300
RELU_FINETUNE_STEPS = 1000
# The applications' budgets (issue 42): the canny plugin's edge F1 was still rising at 2800 steps;
# the LoRA's 800 steps are `configs/lora.py:tiny`'s (BENCHMARKS.md, 'Control plugin', 'LoRA').
PLUGIN_STEPS = 1000
LORA_STEPS = 800
VARIANTS = ("quick", "relu")  # combined with a comma: `configs/main.py:quick,relu`

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


def _vae(quick):
  """The f=4, c=8 autoencoder at CPU scale: 64 px → 16×16×8 latents."""
  config = load_config("vae.py:tiny", relative_to=__file__)
  model = config.model
  model.num_groups = 4
  model.encoder.channels, model.encoder.channel_mult = 16, (1, 2, 4)
  model.decoder.channels, model.decoder.channel_mult = 16, (1, 2, 4)
  model.encoder.mid_attention = model.decoder.mid_attention = False
  model.light_decoder.channels, model.light_decoder.channel_mult = 8, (1, 2, 4)
  config.num_train_steps = 6 if quick else 1200
  config.gan.start_step = config.num_train_steps * 2 // 3
  config.optimizer.lr = 1e-3
  # The decoder also reconstructs from noised latents (l-DeTok; `training/vae.py`), so the latents
  # hold the kind through the noise of x_t (BENCHMARKS.md, 'Recipe history').
  config.latent_noise = 1.0
  config.checkpoint_every = config.sample_every = 400
  return config


def _decoder_distill(quick):
  config = load_config("decoder_distill.py:tiny", relative_to=__file__)
  config.model = _vae(quick).model
  config.optimizer.lr = 1e-3
  config.num_train_steps = 4 if quick else DECODER_DISTILL_STEPS
  config.init_checkpoint = "{workdir}/vae"
  config.checkpoint_every = config.sample_every = 500
  return config


def _diffusion(quick):
  config = load_config("diffusion.py:tiny", relative_to=__file__)
  config.latents.kind = "vae"
  config.latents.checkpoint = "{workdir}/decoder_distill"  # the light decoder's run
  # No pretrained CLIP can be downloaded here, so the random-init text encoder learns with the
  # UNet; with real CLIP weights (`text_encoder.path`), keep it frozen, as the paper does.
  config.text_encoder.train = True
  # v-prediction (its loss keeps weight at high noise, where the layout is decided; UFOGen's one
  # step reads x0 from v without dividing by √ᾱ_T) and the caption pooled into the time
  # embedding, instead of the paper's ε and cross-attention only. The schedule stays SD's.
  config.prediction = "v"
  # quick (CI's check of the job's wiring, whose figures mean nothing after 10 steps): the
  # two-level tiny UNet with the same switches. Every later stage's programs are built on this
  # UNet, and two levels compile in about half the time of three (BENCHMARKS.md, 'The test suite
  # (session 40)').
  levels = 2 if quick else 3
  config.model = load_config(
    f"models/tiny.py{'' if quick else ':three_levels'}", relative_to=__file__
  )
  config.model.text_dim = config.text_encoder.hidden_size
  config.model.pooled_text = True
  # Full ResNet blocks at every level instead of the paper's separable ones at the inner two: they
  # draw colour and placement far better and cost little more time here, since XLA:CPU's
  # depthwise convs are memory-bound (BENCHMARKS.md, 'Recipe history'). The separable blocks save
  # phone FLOPs; `configs/models/mobilediffusion.py` keeps them.
  config.model.block_types = ("resnet",) * levels
  # Cross-attention at the 16×16 level too (the 64 px phase's full latent resolution), both ways
  # down and up: the shapes' placement is learned there (BENCHMARKS.md, 'Recipe history').
  config.model.down_transformer_depths = ((1,),) * levels
  config.model.up_transformer_depths = ((1, 1),) * levels
  # quick: the 64 px phase is left empty (its step would be one more program to compile); the
  # phase switch is tested in tests/test_trainer.py. Later stages still work at 64 px.
  # Most of the images at 64 px, where a small shape's outline (its kind) is 3.5 latent pixels
  # wide; at 32 px it is under 2 and only colours, sizes and places can be learned.
  config.progressive.steps = (10, 0) if quick else (2000, 2500)
  # Representation alignment (REPA; `md_jax/training/representation_alignment.py`): in both
  # phases the UNet's middle, through a 64-wide head, is pulled toward the latent classifier's map
  # of the clean latent. Unlike a classifier loss on x̂_0, it leaves the output path to the
  # denoising loss, so the UNet learns the kinds without losing the colours (BENCHMARKS.md,
  # 'Recipe history').
  config.model.representation_dim = 64  # the latent classifier's last width (checked)
  config.representation_alignment.update(
    checkpoint="{workdir}/latent_classifier", weight=2.0, every_phase=True
  )
  config.progressive.batch_sizes = (32, 32)
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_steps = 100
  # Cosine decay to zero at the last step, across both phases: better than a constant lr here
  # (BENCHMARKS.md, 'Recipe history').
  config.optimizer.decay = "cosine"
  config.optimizer.decay_steps = sum(config.progressive.steps)
  config.ema_decay = 0.995
  config.checkpoint_every = 500
  config.max_checkpoints_to_keep = 8  # every 500 steps kept: accuracy over training is evaluable
  config.sample_every = 0
  return config


def _relu_finetune(quick):
  """The diffusion run's attention finetuned from softmax into relu (paper Sec. 3.2), at its final
  resolution: relu(QKᵀ/√d)/N quantizes without softmax's exponentials."""
  config = _diffusion(quick)
  config.stage = "relu_finetune"
  config.model.attention_fn = "relu"
  config.init_checkpoint = "{workdir}/diffusion"
  # 1000 steps: within 0.007 of softmax with 50 steps, where 500 left 0.018 (BENCHMARKS.md,
  # 'relu attention in the main job'); the paper runs ~10K.
  steps = 1 if quick else RELU_FINETUNE_STEPS
  prog = config.progressive
  prog.resolutions, prog.batch_sizes = prog.resolutions[-1:], prog.batch_sizes[-1:]
  prog.steps = (steps,)
  config.data.resolution, config.global_batch_size = prog.resolutions[0], prog.batch_sizes[0]
  # From the annealed softmax model: a tenth of its peak lr, decayed to zero over the finetune.
  config.optimizer.lr = 2e-4
  config.optimizer.warmup_steps = steps // 10
  config.optimizer.decay_steps = steps
  config.checkpoint_every = steps
  return config


def _ufogen(quick, base):
  """One-step G from the `base` stage's UNet (paper Sec. 4): full finetuning, diffusion loss."""
  config = load_config("ufogen.py:tiny", relative_to=__file__)
  base_config = (_relu_finetune if base == "relu_finetune" else _diffusion)(quick)
  config = inherit_from_diffusion(config, base_config)
  config.init_checkpoint = "{workdir}/" + base
  # At UFOGen's jump of T/4 D never leaves chance on this budget: G's x0' is blurry only at large
  # t, where x_{t'} is mostly noise. With t' = t − 750, D sees G's x0' of t ≥ 750 (the one-step
  # regime) at t' < 250 and learns (`benchmarks/discriminator_probe`).
  config.ufogen.jump = 750
  config.ufogen.discriminator.optimizer.lr = 1e-3
  # G at 3e-5 for 800 steps: from the cosine-annealed teacher, a larger lr for fewer steps undoes
  # part of the annealing (BENCHMARKS.md, 'Recipe history').
  config.optimizer.lr = 3e-5
  config.global_batch_size = 16
  # The guide's cross-entropy of the caption's attributes on the fake x'_{t'} that D sees (AC-GAN
  # style, `training/ufogen.py`), at weight 2, past which accuracy flattens and Fréchet rises
  # (BENCHMARKS.md, 'Recipe history').
  config.data.label_keys = tuple(LABEL_NAMES)
  config.ufogen.classifier.update(checkpoint="{workdir}/latent_classifier", weight=2.0)
  config.num_train_steps = 3 if quick else 800
  config.checkpoint_every = config.sample_every = 400
  return config


def _step_distill(quick):
  """The 50-step teacher distilled to 8 steps (progressive distillation, 32 → 16 → 8)."""
  config = load_config("step_distill.py:tiny", relative_to=__file__)
  config = inherit_from_diffusion(config, _diffusion(quick))
  config.init_checkpoint = "{workdir}/diffusion"
  config.step_distill.teacher_steps = 32
  # SnapFusion's CFG-aware distillation with every example read through CFG: the student stays a
  # plain UNet, sampled with CFG (two calls a step). Folding the scale into a guidance-conditioned
  # student (Meng et al., one call a step; `configs/step_distill.py`'s default) cost this small
  # UNet Fréchet distance at any budget tried (BENCHMARKS.md, 'Step distillation').
  config.step_distill.mode = "cfg_aware"
  config.step_distill.cfg_aware_probability = 1.0
  config.model.guidance_embedding = False
  config.step_distill.guidance_range = (2.0, 4.0)  # around the job's evaluation scale, CFG 3
  steps = (1, 1) if quick else (STEP_DISTILL_ROUND_STEPS,) * 2
  config.progressive.resolutions = (config.data.resolution,) * len(steps)
  config.progressive.batch_sizes = (16,) * len(steps)
  config.progressive.steps = steps
  config.checkpoint_every = max(steps)
  return config


def _application(quick, file, steps, base):
  """A module trained on the frozen `base` stage only (the model UFOGen's G is finetuned from;
  paper Sec. 5.4), then used unchanged with it and the one-step generator
  (`config.applications`)."""
  base_config = (_relu_finetune if base == "relu_finetune" else _diffusion)(quick)
  config = inherit_from_diffusion(load_config(file, relative_to=__file__), base_config)
  config.init_checkpoint = "{workdir}/" + base
  config.num_train_steps = 2 if quick else steps
  config.checkpoint_every = config.num_train_steps
  return config


def _plugin(quick, condition, base):
  """A T2I-Adapter-style control plugin reading `condition` (`data/conditions.py`)."""
  config = _application(quick, "plugin.py:tiny", PLUGIN_STEPS, base)
  config.plugin.condition = condition
  config.data.conditions = (condition,)
  return config


def _lora(quick, base):
  """DreamBooth-LoRA: a `bar`, a kind `shapes` never draws, bound to the token `sks`."""
  config = _application(quick, "lora.py:tiny", LORA_STEPS, base)
  config.lora.export = "{workdir}/lora/lora.safetensors"
  if quick:  # one UNet pass a step, not two (tests/test_lora_stage.py's run keeps the prior)
    config.lora.prior_weight = 0.0
  return config


def _latent_classifier(quick):
  """The noise-aware attribute classifier whose gradient guides the 50-step sampler."""
  config = load_config("latent_classifier.py", relative_to=__file__)
  diffusion = _diffusion(quick)
  config.latents, config.schedule = diffusion.latents, diffusion.schedule
  # Half the default widths: guidance as good, training and guided sampling faster. 3000 steps:
  # at half that the guide reads the kinds worse (BENCHMARKS.md, 'Recipe history'). quick: two
  # levels, as its UNet has (representation alignment pairs their maps).
  config.model.channels = (32, 64) if quick else (16, 32, 64)
  # 32 images, each noised twice: the VAE encoder and the input pipeline cost most of a step.
  config.global_batch_size, config.noise_draws = 32, 2
  config.num_train_steps = config.optimizer.decay_steps = 3 if quick else 3000
  config.checkpoint_every = 1000
  return config


def _shapes_classifier(quick):
  config = load_config("shapes_classifier.py", relative_to=__file__)
  config.model.channels = (16, 32, 64, 64)
  config.optimizer.lr = 2e-3
  config.num_train_steps = 5 if quick else 1000
  return config


def get_config(arg=None):
  options = set(arg.split(",")) if arg else set()
  if options - set(VARIANTS):
    raise ValueError(f"configs/main.py: unknown variant {arg!r} (known: {', '.join(VARIANTS)})")
  quick = "quick" in options
  # UFOGen's G starts from the softmax model, or with `relu` from the relu finetune (issue 47).
  one_step_base = "relu_finetune" if "relu" in options else "diffusion"
  config = ml_collections.ConfigDict()
  config.stage = "main"
  config.seed = 0
  # Two XLA devices on a 2-core CPU host, each stage's batch split over them: the diffusion
  # step (VAE encoder + UNet) runs faster than on one device (BENCHMARKS.md, 'Train-step
  # efficiency'). No effect on accelerators.
  config.cpu_devices = 2
  config.order = (
    "vae",
    "decoder_distill",
    "latent_classifier",
    "diffusion",
    "relu_finetune",
    "step_distill",
    "ufogen",
    "shapes_classifier",
    # Trained on G's base model (never on G), scored with both (`config.applications`).
    "plugin",
    "lora",
    "inpaint_plugin",
  )
  if quick:
    # The relu finetune's 64 px training and sampling programs would add ~3 min of compiles to
    # CI's quick job (`quick,relu` runs it, and UFOGen from it); the inpainting plugin is the
    # canny plugin's stage with another condition, so the quick job inpaints training-free only.
    left_out = {"inpaint_plugin"} | ({"relu_finetune"} if one_step_base == "diffusion" else set())
    config.order = tuple(name for name in config.order if name not in left_out)
  config.stages = ml_collections.ConfigDict(
    {
      "vae": _vae(quick),
      "decoder_distill": _decoder_distill(quick),
      "diffusion": _diffusion(quick),
      "step_distill": _step_distill(quick),
      "ufogen": _ufogen(quick, one_step_base),
      "relu_finetune": _relu_finetune(quick),
      "latent_classifier": _latent_classifier(quick),
      "shapes_classifier": _shapes_classifier(quick),
      "plugin": _plugin(quick, "canny", one_step_base),
      "lora": _lora(quick, one_step_base),
      "inpaint_plugin": _plugin(quick, "inpaint", one_step_base),
    }
  )
  # Classifier guidance (Dhariwal & Nichol, 2021) toward every captioned attribute by the
  # `latent_classifier` stage's classifier: −30·σ_t·∇ log p(attributes | x_t) added to CFG's noise
  # estimate for t ≤ 799. It reads the dataset's labels, so it serves `shapes`-grammar prompts
  # only; `eval.json` keeps the unguided figure beside it.
  guidance = {"latent_classifier": "latent_classifier", "classifier_scale": 30.0}
  config.samples = ml_collections.ConfigDict(
    {"checkpoint": "diffusion", "prompts": PROMPTS, "sampler": "ddim", "steps": 50, "cfg": 3.0,
     **guidance}
  )  # fmt: skip
  if quick:
    config.samples.steps = 2
  config.evaluator = "shapes_classifier"  # the stage whose classifier scores the images
  config.eval_images = 64 if quick else 512
  # Paper Sec. 5.2: DDIM, CFG ≈ 3. Later stages add their one-step evaluation beside this one.
  ddim = {"checkpoint": "diffusion", "sampler": "ddim", "steps": 2 if quick else 50}
  one_step = {"checkpoint": "ufogen", "sampler": "ufogen", "steps": 1, "cfg": 1.0}
  # The distilled student's 8 steps with CFG 3.
  student = {"checkpoint": "step_distill", "sampler": "ddim", "steps": 2 if quick else 8}
  config.evaluations = ml_collections.ConfigDict(
    {"diffusion": {**ddim, "cfg": 3.0}, "diffusion_guided": {**ddim, "cfg": 3.0, **guidance},
     "relu_finetune": {**ddim, "checkpoint": "relu_finetune", "cfg": 3.0},
     "step_distill": {**student, "cfg": 3.0}, "ufogen": one_step}
  )  # fmt: skip
  # The one-step model as exported for phones, each format scored like the JAX model (issue 47).
  formats = ("litert_fp32",) if quick else (
    "litert_fp32", "litert_fp16", "litert_int8", "iree_host"
  )  # fmt: skip
  config.artifact_evaluation = ml_collections.ConfigDict(
    {"checkpoint": "ufogen", "formats": formats}
  )
  # Control, personalization and inpainting with the teacher and the one-step generator, each
  # module trained on the teacher only (G's base: `diffusion`, or `relu_finetune` with `relu`;
  # issue 42, paper Sec. 5.4): `eval.json`'s "applications" and `<workdir>/applications.png`
  # (condition | 50-step teacher | one-step).
  config.applications = ml_collections.ConfigDict(
    {"teacher": {**ddim, "checkpoint": one_step_base, "cfg": 3.0}, "one_step": one_step,
     "control": "plugin", "lora": "lora", "inpainting": "inpaint_plugin",
     "num_images": 16 if quick else 256,
     "num_concept": 8 if quick else 128, "grid_rows": 4}
  )  # fmt: skip
  return config
