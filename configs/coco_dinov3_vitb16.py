"""MS COCO 2017 val (5,000 images, 81 classes) with DINOv3 ViT-B/16 (LVD-1689M) at 448 (a 28x28 patch grid).

Run:
  python -m experiments.segment --config=configs/coco_dinov3_vitb16.py --workdir=/tmp/jaxseg_coco_dinov3_vitb16

Needs the dataset in TFDS's data_dir (prepared on first use from the official
archives in --config.data.manual_dir, see README) and the backbone's weights: the
Hub repository facebook/dinov3-vitb16-pretrain-lvd1689m is gated (request access on
its page, then set HF_TOKEN), or pass Meta's .pth as --config.model.weights=/path/file.pth.
DINOv3 weights are under Meta's DINOv3 License.

Regions as configs/coco_dinov2_vitb14.py: each 8-connected foreground component
of at least 1% of the image is labelled on its own (at 448 pixels and patch 16,
1% is about eight patches).
"""

from configs import coco_dinov2_vitb14


def get_config():
  config = coco_dinov2_vitb14.get_config()
  config.model.variant = "dinov3_vitb16"
  return config
