"""MS COCO 2017 val (5,000 images, 81 classes) with DINOv2 ViT-B/14 at 448.

Run:
  python -m experiments.segment --config=configs/coco_dinov2_vitb14.py --workdir=/tmp/jaxseg_coco_dinov2_vitb14

Needs the dataset in TFDS's data_dir (prepared on first use from the official
archives in --config.data.manual_dir, see README) and the backbone's weights
(downloaded on first use into ~/.cache/jaxseg).

Regions: a COCO image usually holds objects of several classes (VOC images
mostly one), so each 8-connected foreground component is labelled on its own
instead of the whole mask taking one class. Components under 1% of the image
area become background: at 448 pixels one patch is 1/1024 of the image, so
1% is about ten patches, the least that gives a region a descriptor of its own
rather than CRF fringe (about 55 x 55 pixels of a 640 x 480 photo, COCO's
"medium" objects; smaller ones cannot be resolved at this patch grid anyway).
A fraction, not pixels, so the rule means the same at any image size.
"""

from configs import _base


def get_config():
  config = _base.get_dataset_config("dinov2_vitb14", "coco_object", 80)
  config.method.min_region_fraction = 0.01
  config.crf.canvas_pixels = 1 << 20  # every COCO photo (<= 640 x 640) fits; 3 per canvas fill ~90%
  return config
