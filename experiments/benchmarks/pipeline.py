"""The whole method: seconds per image for each stage, ViT-S/14 at 448, on this machine.

Runs the segment pipeline twice on the photographs that ship with scikit-image
(random weights: the cost does not depend on them): once to compile, then in a
fresh workdir for the steady-state timings. The per-stage references are the
other benchmarks (vit, kmeans, crf); this one shows where the time goes.
"""

import tempfile

from configs import demo
from experiments import runner


def _config(data_dir: str, images: int):
  config = demo.get_config()
  config.model.weights = "random"
  config.data.data_dir = data_dir
  config.data.limit = images
  config.image_size = 448
  config.batch_size = 4
  return config


def run(images: int = 8) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    config = _config(f"{tmp}/data", images)
    runner.run(config, f"{tmp}/warmup")
    metrics = runner.run(config, f"{tmp}/timed")
  n = metrics["num_images"]
  print(f"pipeline, dinov2_vits14 at 448, {n} scikit-image photographs, steady state (compiled in a first run)")
  for stage, seconds in metrics["seconds"].items():
    print(f"  {stage:<22s} {seconds / n:8.3f} s/image")
  print(f"  {'total':<22s} {sum(metrics['seconds'].values()) / n:8.3f} s/image", flush=True)
