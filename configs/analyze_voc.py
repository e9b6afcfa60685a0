"""Feature analysis on PASCAL VOC 2012: which backbone, block and feature separates foreground from background.

Run:
  python -m experiments.analyze_features --config=configs/analyze_voc.py --workdir=/tmp/jaxseg_analyze_voc

Probes are fitted on a reservoir of at most probe.samples patches of `train`
(1,464 images) and everything is scored on `val` (1,449 images), at 448 pixels
(56x56 patches for patch 8, 32x32 for patch 14, 28x28 for patch 16; image_size
must be a multiple of every backbone's patch size). Writes analysis.csv, analysis.md and
figures/*.png into the workdir; a restart skips finished backbones. Needs the
dataset prepared in data.data_dir (see README) and each backbone's weights
(downloaded on first use). --config.model.weights=random makes a smoke run.
Every block of seven backbones (DINO, DINOv2 and DINOv3): hours on a CPU, minutes on a GPU; narrow it
with e.g. --config.backbones="('dinov2_vits14',)" --config.blocks="(-1, 6)".
"""

import ml_collections

from configs import _base


def get_config():
  config = _base.get_base_config()
  del config.model.variant  # replaced by the backbones list
  del config.gallery_size
  del config.crf  # the analysis stops before refinement
  if "distributed" in config:
    del config.distributed  # one process
  config.backbones = ("dino_vits8", "dino_vitb8", "dinov2_vits14", "dinov2_vitb14", "dinov2_vitb14_reg",
                      "dinov3_vits16", "dinov3_vitb16")
  config.blocks = ()  # block indices, negative from the end; () = every block
  config.features = ("q", "k", "v", "tokens", "cls-attention")  # cls-attention: last block only
  config.batch_size = 4  # every block's q, k, v, tokens of a batch are held at once
  config.data.name = "voc_seg"
  config.data.split = "val"  # scored split
  config.data.probe_split = "train"  # split the linear probes are fitted on
  config.data.probe_limit = 0  # first N images of probe_split; 0 = all

  config.probe = ml_collections.ConfigDict()
  config.probe.samples = 10_000  # labelled patches kept (reservoir) per (block, feature) to fit the probe
  config.probe.steps = 300  # Adam steps of the logistic regression
  config.probe.learning_rate = 0.05
  config.probe.l2 = 1e-4
  config.probe.batch_size = 0  # patches per step; 0 = all samples every step

  config.two_means = ml_collections.ConfigDict()  # per-image 2-means of every (block, feature)
  config.two_means.n_init = 3
  config.two_means.max_iter = 100
  config.two_means.tol = 1e-4

  config.figure_images = 4  # images in figures/examples.png
  return config
