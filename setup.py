"""md_jax: MobileDiffusion training, sampling and export in JAX/Flax."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [line for line in lines if line and not line.startswith("#")]


setuptools.setup(
  name="md_jax",
  version="0.1.0",
  description="MobileDiffusion in JAX/Flax: TPU-pod training, one-step UFOGen, mobile export.",
  python_requires=">=3.11",
  packages=setuptools.find_packages(include=["md_jax", "md_jax.*"]),
  package_data={"md_jax": ["data/assets/*/*"]},
  install_requires=_requirements("requirements.txt"),
  extras_require={
    # torch (CPU) only for parity tests against transformers' PyTorch CLIP; diffusers for the
    # peer benchmark (md_jax.benchmarks.peer_diffusers); pytorch-fid (and the torchvision it
    # builds its InceptionV3 from) for FID parity (tests/test_inception.py).
    # libtpu (the version jax 0.10.2 pins) lets the tests compile for a TPU topology on CPU.
    "test": [
      "pytest==9.2.0",
      "pytest-xdist==3.8.0",
      "ruff==0.17.6",
      "torch==2.13.0",
      "diffusers==0.42.1",
      "torchvision==0.28.0",
      "pytorch-fid==0.3.0",
      "libtpu==0.0.42.1",
    ],
    # Ahead-of-time compilation for TPU topologies on a CPU machine.
    "tpu": ["libtpu==0.0.42.1"],
  },
)
