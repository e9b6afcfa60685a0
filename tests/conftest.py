"""Test setup: JAX on CPU, deterministic seeds."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
  np.random.seed(0)
  try:
    import torch
    torch.manual_seed(0)
  except ImportError:
    pass
