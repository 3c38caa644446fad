"""The steps-versus-quality benchmark's bookkeeping: round discovery, UNet-call counting, skipped
stages, the ratio and the plot. No model is trained or sampled here."""

import json
import math

import pytest
from PIL import Image

from md_jax.benchmarks import steps_curve
from md_jax.infra import checkpoints


def _complete(step_dir):
  """A step directory that reads as a complete checkpoint (`resolve_checkpoint` looks for
  `state` in it)."""
  (step_dir / "state").mkdir(parents=True)
  return step_dir


def _distill_config(teacher_steps, round_steps):
  return {
    "step_distill": {"teacher_steps": teacher_steps},
    "model": {"guidance_embedding": True},
    "progressive": {
      "resolutions": [32] * len(round_steps),
      "batch_sizes": [8] * len(round_steps),
      "steps": list(round_steps),
    },
    "data": {"resolution": 32},
    "global_batch_size": 8,
    "num_train_steps": sum(round_steps),
  }


@pytest.fixture
def fake_distill(tmp_path, monkeypatch):
  """A job whose step_distill run has 4 rounds of 100, 50, 50 and 25 steps from a 32-step
  teacher, with the first, second and fourth rounds' checkpoints written."""
  run = tmp_path / "step_distill"
  for step in (100, 150, 225):
    _complete(run / "checkpoints" / str(step))
  read = []

  def saved_config(path, what="config.init_checkpoint"):
    read.append(path)
    return _distill_config(32, (100, 50, 50, 25))

  monkeypatch.setattr(checkpoints, "saved_config", saved_config)
  return tmp_path, read


def test_student_rounds_halve_the_teacher_steps_per_round(fake_distill, capsys):
  job, read = fake_distill
  rounds = steps_curve.student_rounds(job)
  assert read == [str(job / "step_distill")]
  run = job / "step_distill" / "checkpoints"
  # Round 2 (4 steps, ends at 200) has no checkpoint: skipped, the others keep their order.
  assert rounds == [(16, run / "100"), (8, run / "150"), (2, run / "225")]
  out = capsys.readouterr().out
  assert "round 2 (4 steps)" in out and "skipped" in out
  assert out.count("\n") == 1


def test_student_round_being_written_is_skipped(fake_distill, capsys):
  job, _ = fake_distill
  (job / "step_distill" / "checkpoints" / "200").mkdir()  # no `state` yet: still being written
  assert [steps for steps, _ in steps_curve.student_rounds(job)] == [16, 8, 2]
  assert "round 2" in capsys.readouterr().out


def test_student_rounds_without_steps_left_are_skipped(tmp_path, monkeypatch, capsys):
  run = tmp_path / "step_distill" / "checkpoints"
  for step in (10, 20, 30):
    _complete(run / str(step))
  monkeypatch.setattr(checkpoints, "saved_config", lambda *a, **k: _distill_config(4, (10,) * 3))
  assert steps_curve.student_rounds(tmp_path) == [(2, run / "10"), (1, run / "20")]
  assert "round 2: teacher_steps=4 leaves no steps" in capsys.readouterr().out


@pytest.mark.parametrize(
  "model, sampler, steps, cfg, calls",
  [
    ("teacher", "ddim", 50, 3.0, 100),  # conditional + unconditional each step
    ("teacher", "dpm++", 8, 3.0, 16),
    ("teacher", "ddim", 50, 1.0, 50),  # no guidance, one call
    ("student", "ddim", 8, 3.0, 8),  # guidance folded into the student
    ("student", "ddim", 8, 3.0, 16),  # a "cfg_aware" student is read through CFG
    ("ufogen", "ufogen", 4, 1.0, 4),
  ],
)
def test_calls_per_image(model, sampler, steps, cfg, calls):
  folded = model == "student" and calls == steps
  assert steps_curve.calls_per_image(model, sampler, steps, cfg, folded) == calls


def test_missing_stages_are_skipped_with_one_line_each(tmp_path, capsys):
  _complete(tmp_path / "diffusion" / "checkpoints" / "7")
  (tmp_path / "ufogen").mkdir()  # started, nothing saved yet
  runs = steps_curve.planned_runs(tmp_path, teacher_steps=(1, 50), cfg=3.0)
  assert [(r.model, r.sampler, r.steps) for r in runs] == [
    ("teacher", "ddim", 1),
    ("teacher", "ddim", 50),
    ("teacher", "dpm++", 1),
    ("teacher", "dpm++", 50),
  ]
  assert all(r.checkpoint == tmp_path / "diffusion" and r.cfg == 3.0 for r in runs)
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2
  assert lines[0].startswith("student: skipped") and "does not exist" in lines[0]
  assert lines[1].startswith("ufogen: skipped") and "no complete checkpoint" in lines[1]


def test_only_chooses_groups(tmp_path, capsys):
  _complete(tmp_path / "diffusion" / "checkpoints" / "7")
  _complete(tmp_path / "ufogen" / "checkpoints" / "3")
  runs = steps_curve.planned_runs(tmp_path, groups=("ufogen",))
  assert [(r.model, r.sampler, r.steps, r.cfg) for r in runs] == [
    ("ufogen", "ufogen", 1, 1.0),
    ("ufogen", "ufogen", 2, 1.0),
    ("ufogen", "ufogen", 4, 1.0),
  ]
  assert capsys.readouterr().out == ""


def _row(model, sampler, steps, latency, cfg=3.0):
  run = steps_curve.Run(model, sampler, steps, cfg, "ckpt")
  images_per_s = 1000.0 / latency if latency else float("nan")
  result = {"overall_accuracy": 0.5 + steps / 200, "frechet_distance": 100.0 / steps,
            "images_per_s": images_per_s, "checkpoint_step": 1, "num_images": 64}  # fmt: skip
  return steps_curve.make_row(run, result)


def test_row_latency_is_per_image_and_none_when_untimed():
  row = _row("teacher", "ddim", 50, 250.0)
  assert row["latency_ms_per_image"] == pytest.approx(250.0)
  assert row["unet_calls_per_image"] == 100
  untimed = _row("teacher", "ddim", 1, None)
  assert untimed["latency_ms_per_image"] is None and untimed["images_per_s"] is None
  json.loads(json.dumps(untimed, allow_nan=False))  # strict JSON: no NaN


def test_latency_ratio_needs_both_rows():
  rows = [_row("teacher", "ddim", 50, 400.0), _row("teacher", "dpm++", 50, 100.0),
          _row("student", "ddim", 4, 5.0)]  # fmt: skip
  assert steps_curve.latency_ratio(rows) is None
  rows.append(_row("student", "ddim", 8, 10.0))
  assert steps_curve.latency_ratio(rows) == pytest.approx(10.0 / 400.0)
  # The teacher without CFG is not the baseline the issue asks for.
  unguided = [_row("teacher", "ddim", 50, 200.0, cfg=1.0), _row("student", "ddim", 8, 10.0)]
  assert steps_curve.latency_ratio(unguided) is None


def _synthetic_rows():
  rows = [_row("teacher", s, n, 8.0 * n) for s in ("ddim", "dpm++") for n in (1, 2, 8, 50)]
  rows += [_row("student", "ddim", n, 4.0 * n) for n in (2, 4, 8)]
  rows += [_row("ufogen", "ufogen", n, 5.0 * n, cfg=1.0) for n in (1, 2)]
  rows.append(
    _row("ufogen", "ufogen", 4, None, cfg=1.0)
  )  # untimed: left off the latency panel only
  return rows


def test_plot_writes_a_png(tmp_path):
  path = tmp_path / "steps_curve.png"
  steps_curve.plot(_synthetic_rows(), path)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG" and image.width > image.height > 300  # two panels side by side


def test_table_and_summary(tmp_path):
  rows = _synthetic_rows()
  table = steps_curve.markdown_table(rows).splitlines()
  assert len(table) == 2 + len(rows)
  assert table[-1].startswith("| ufogen | ufogen | 4 | 1 | 4 |") and table[-1].endswith("| n/a |")
  summary = steps_curve.summary(rows, cfg=3.0)
  assert summary["rows"] == rows and summary["cpu_count"] >= 1 and summary["date"]
  assert math.isclose(summary[steps_curve.RATIO_KEY], 32.0 / 400.0)  # student 8 ÷ teacher ddim 50
  json.loads(json.dumps(summary, allow_nan=False))


def test_run_curve_scores_every_stage_and_writes_json_and_png(fake_distill, capsys):
  job, _ = fake_distill
  _complete(job / "diffusion" / "checkpoints" / "40")
  _complete(job / "ufogen" / "checkpoints" / "20")
  (job / "shapes_classifier").mkdir()
  calls = []

  def evaluate(checkpoint, classifier, *, sampler, steps, cfg, num_images, batch_size, seed):
    calls.append((checkpoint, sampler, steps, cfg))
    assert classifier == str(job / "shapes_classifier")
    assert (num_images, batch_size, seed) == (64, 16, 3)
    # A plain UNet under CFG pays two calls a step; the others one.
    per_step_ms = 2.0 if checkpoint.endswith("diffusion") and cfg != 1.0 else 1.0
    return {"overall_accuracy": 0.9, "frechet_distance": 10.0 / steps, "checkpoint_step": 1,
            "images_per_s": 1000.0 / (per_step_ms * steps), "num_images": num_images}  # fmt: skip

  out = job / "curve"
  result = steps_curve.run_curve(
    job, out, teacher_steps=(8, 50), cfg=2.0, num_images=64, batch_size=16, seed=3,
    evaluate=evaluate,
  )  # fmt: skip
  distill = job / "step_distill" / "checkpoints"
  assert calls == [
    (str(job / "diffusion"), "ddim", 8, 2.0),
    (str(job / "diffusion"), "ddim", 50, 2.0),
    (str(job / "diffusion"), "dpm++", 8, 2.0),
    (str(job / "diffusion"), "dpm++", 50, 2.0),
    (str(distill / "100"), "ddim", 16, 2.0),
    (str(distill / "150"), "ddim", 8, 2.0),
    (str(distill / "225"), "ddim", 2, 2.0),
    (str(job / "ufogen"), "ufogen", 1, 1.0),
    (str(job / "ufogen"), "ufogen", 2, 1.0),
    (str(job / "ufogen"), "ufogen", 4, 1.0),
  ]
  assert result[steps_curve.RATIO_KEY] == pytest.approx(8.0 / 100.0)
  assert json.loads((out / "steps_curve.json").read_text()) == json.loads(json.dumps(result))
  assert len(result["rows"]) == len(calls)
  assert (out / "steps_curve.png").read_bytes()[:4] == b"\x89PNG"
  printed = capsys.readouterr().out
  assert "| student | ddim | 8 | 2 | 8 | 0.900 | 1.250 | 8.0 |" in printed
  assert "latency: 0.080" in printed


def test_cli_with_no_stage_yet_ends_on_one_json_line(tmp_path):
  import subprocess
  import sys

  (tmp_path / "shapes_classifier").mkdir()
  out = subprocess.run(
    [sys.executable, "-m", "md_jax.benchmarks.steps_curve", f"--workdir={tmp_path}",
     "--only=teacher,ufogen"],
    capture_output=True, text=True, check=True, timeout=120,
  ).stdout.splitlines()  # fmt: skip
  assert out[0].startswith("teacher: skipped") and out[1].startswith("ufogen: skipped")
  assert not any(line.startswith("student:") for line in out)  # not asked for
  summary = json.loads(out[-1])
  assert summary["rows"] == [] and summary[steps_curve.RATIO_KEY] is None
  assert summary["cpu_count"] >= 1 and "processor" in summary
  assert (tmp_path / "steps_curve" / "steps_curve.json").exists()


def test_cli_without_the_classifier_fails_with_one_line(tmp_path):
  import subprocess
  import sys

  done = subprocess.run(
    [sys.executable, "-m", "md_jax.benchmarks.steps_curve", f"--workdir={tmp_path}"],
    capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert done.returncode == 1
  assert (
    done.stderr.strip().splitlines()[-1].startswith("FATAL") and "shapes_classifier" in done.stderr
  )
