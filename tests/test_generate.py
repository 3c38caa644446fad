"""`python -m md_jax.generate` on a tiny diffusion checkpoint."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from md_jax import generate
from tests.test_trainer import _config, _train

REPO = pathlib.Path(__file__).parents[1]
PROMPTS = ["a large red circle on a white background", "a small blue square on a black background"]


@pytest.fixture(scope="module")
def diffusion_run(shapes_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("diffusion")
  _train(_config(shapes_data_dir, total_steps=2), workdir)
  return workdir


@pytest.mark.parametrize("sampler, steps", [("ddim", 2), ("dpm++", 2), ("ufogen", 1)])
def test_every_sampler_makes_images_from_the_checkpoint(diffusion_run, sampler, steps):
  images, settings = generate.generate(
    str(diffusion_run), PROMPTS, sampler=sampler, steps=steps, cfg=3.0, seed=0, resolution=16
  )
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  assert settings["step"] == 2 and settings["sampler"] == sampler
  again, _ = generate.generate(
    str(diffusion_run), PROMPTS, sampler=sampler, steps=steps, cfg=3.0, seed=0, resolution=16
  )
  np.testing.assert_array_equal(images, again)  # the seed decides the noise
  if sampler == "ddim":
    other, _ = generate.generate(
      str(diffusion_run), PROMPTS, sampler=sampler, steps=steps, cfg=3.0, seed=1, resolution=16
    )
    assert not np.array_equal(images, other)


def test_cli_writes_pngs_with_their_prompts_and_reports_bad_input(diffusion_run, tmp_path):
  long_prompt = " ".join(["a large red circle"] * 30) + " on a white background"
  command = [
    sys.executable, "-m", "md_jax.generate", f"--workdir={diffusion_run}", f"--out={tmp_path}",
    f"--prompt={PROMPTS[0]}", f"--prompt={long_prompt}", "--steps=2", "--resolution=16",
  ]  # fmt: skip
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "truncated to 77" in result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["num_images"] == 2 and summary["sampler"] == "ddim"
  first = Image.open(tmp_path / "00.png")
  assert first.size == (16, 16) and first.text["prompt"] == PROMPTS[0]
  assert json.loads(first.text["settings"])["steps"] == 2
  assert (tmp_path / "grid.png").exists()

  missing = subprocess.run(
    [*command[:3], f"--checkpoint={tmp_path / 'nowhere'}", *command[4:]],
    cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert missing.returncode != 0
  last_line = missing.stderr.strip().splitlines()[-1]
  assert last_line == f"FATAL --checkpoint='{tmp_path / 'nowhere'}' does not exist"
  assert "Traceback" not in missing.stderr
