"""What the VOC and COCO builders share: features, dataset info, locating the source files."""

import pathlib

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from jaxseg.data import archive


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
  """Base of the dataset builders: features id (str), image (bytes), mask (uint8 [H, W]).

  Images stay the original file bytes (never re-encoded) and are decoded with PIL on read;
  masks are class indices (255 = ignore), zlib-compressed. Examples keep generation order.
  Subclasses set DESCRIPTION, HOMEPAGE, CITATION and implement the generators (until then this
  class is abstract, so TFDS does not register it).
  """

  DESCRIPTION = HOMEPAGE = CITATION = ""
  # TFDS derives code_path through the optional `importlib_resources` package, absent here.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "mask": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
    })
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=features,
                                 homepage=self.HOMEPAGE, citation=self.CITATION,
                                 disable_shuffling=True)


def configured_manual_dir(dl_manager: tfds.download.DownloadManager) -> pathlib.Path | None:
  """The manual dir if one is set, exists and is non-empty; None to download instead."""
  try:
    return pathlib.Path(dl_manager.manual_dir)
  except (AssertionError, ValueError):
    return None


def wrong_manual_dir(name: str, manual_dir: pathlib.Path, expected: str) -> ValueError:
  """The error for a manual dir that holds none of the expected layouts."""
  return ValueError(f"{name}: manual_dir {manual_dir} does not hold the dataset. Expected there:\n"
                    f"{expected}\nFound: {archive.listing(manual_dir)}")
