"""Static configuration of the method: frozen, hashable, passed to jitted stages as a static argument."""

import dataclasses
from collections.abc import Mapping
from typing import Any

FEATURES = ("q", "k", "v", "tokens")
FG_PRIORS = ("border", "attention")
FUSIONS = ("vote", "intersection", "mean")
DESCRIPTORS = ("crop", "masked", "pooled")


@dataclasses.dataclass(frozen=True)
class CRFParams:
  """The dense CRF's parameters: they make the refined masks (docs/design.md stage 5; the values widely used on VOC).

  iterations = 0 skips the CRF: the mask is then the upsampled probability > 0.5.
  """
  iterations: int = 10
  gaussian_sxy: float = 1.0
  gaussian_weight: float = 3.0
  bilateral_sxy: float = 67.0
  bilateral_srgb: float = 3.0
  bilateral_weight: float = 4.0


@dataclasses.dataclass(frozen=True)
class RefineOptions:
  """How refinement runs (framework.Refiner); canvas_pixels and batch_size change no result.

  max_side: an image whose longer side exceeds it is refined at a copy scaled
  to that side (bilinear, antialiased, as jax.image.resize) and the mask is
  scaled back (nearest), which bounds the CRF's memory (a 4000 x 3000 photo
  would need ~15 GB); 0 = always at full resolution. VOC (<= 500) and COCO
  (<= 640) are never scaled. Unlike the other options it changes the masks of
  the images above it, so fingerprints include it.
  canvas_pixels: images are packed one after the other into flat canvases of
  this many pixels (an image larger than that gets a canvas of the next power
  of two), each image its own CRF. The default, 3 x 2^17, holds two 500 x 375
  VOC photos; COCO's config uses 2^20 (3 COCO photos). A canvas's lattices
  take ~400 bytes per pixel while it is refined.
  batch_size: canvases refined at once (rounded up to the mesh's devices).
  """
  max_side: int = 1024
  canvas_pixels: int = 3 << 17
  batch_size: int = 1


@dataclasses.dataclass(frozen=True)
class CRFConfig:
  """The `crf` section of a config file: the CRF's parameters and the refinement's options in one flat
  record, as users write them (`--config.crf.iterations=...`); .params and .options split it. The defaults
  are CRFParams' and RefineOptions' own."""
  iterations: int = CRFParams.iterations
  max_side: int = RefineOptions.max_side
  canvas_pixels: int = RefineOptions.canvas_pixels
  gaussian_sxy: float = CRFParams.gaussian_sxy
  gaussian_weight: float = CRFParams.gaussian_weight
  bilateral_sxy: float = CRFParams.bilateral_sxy
  bilateral_srgb: float = CRFParams.bilateral_srgb
  bilateral_weight: float = CRFParams.bilateral_weight

  @property
  def params(self) -> CRFParams:
    return CRFParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CRFParams)})

  @property
  def options(self) -> RefineOptions:
    return RefineOptions(max_side=self.max_side, canvas_pixels=self.canvas_pixels)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """Every choice of the method (docs/design.md stages 0-6).

  Attributes:
    feature: last-block feature clustered per patch: "q", "k" (default, the
      "attention feature"), "v" or "tokens" (block output).
    dataset_k: clusters of the dataset-level k-means (>= 2).
    fg_prior: which dataset clusters are foreground: "border" (those whose
      share of image-border patches is below the share over all patches) or
      "attention" (those whose mean CLS attention is above the overall mean).
      At least one cluster is foreground and one background.
    num_categories: image groups of the category level (k-means of CLS tokens).
    fusion: "vote" (>= 2 of 3 levels), "intersection" (all 3) or "mean" (mean
      soft score > 0.5). The fused probability is the matching soft rule
      (median, minimum, mean of the level scores), so thresholding it at 0.5
      gives the fused mask and the CRF refines the fused decision.
    score_temperature: a level's soft score is sigmoid(margin / temperature),
      margin = cos(patch, fg centroid) - cos(patch, bg centroid); 0.5 exactly
      on the k-means decision boundary.
    descriptor: region descriptor for labeling: "crop" (CLS of the ViT run on
      the region's box), "masked" (CLS with attention restricted to the
      region's patches) or "pooled" (mean of the region's patch tokens).
    min_region_area, min_region_fraction: both 0 = one region per image (the
      whole foreground mask, VOC's default); otherwise 8-connected components
      of at least max(min_region_area pixels, min_region_fraction of the
      image's area), at the image's own resolution; smaller components become
      background. The fraction means the same at any image size (COCO's
      configs use it).
    num_classes: clusters of region descriptors (20 for VOC, 80 for COCO).
    sample_budget: at most this many patches are sampled (reservoir) for the
      dataset-level k-means; the category level samples sample_budget //
      num_categories patches per category; at most this many descriptors are
      sampled to fit the class k-means (all descriptors are then assigned).
    kmeans_n_init, kmeans_max_iter, kmeans_tol: k-means++ restarts, Lloyd
      iterations and relative tolerance (scikit-learn's defaults) for every
      k-means of the method; the 2-means of the category and image levels
      start from their parent's centroids, so run once.
    crf: the CRF's parameters and the refinement's options (crf.params, crf.options).
  """
  feature: str = "k"
  dataset_k: int = 2
  fg_prior: str = "border"
  num_categories: int = 20
  fusion: str = "vote"
  score_temperature: float = 0.1
  descriptor: str = "crop"
  min_region_area: int = 0
  min_region_fraction: float = 0.0
  num_classes: int = 20
  sample_budget: int = 1_000_000
  kmeans_n_init: int = 10
  kmeans_max_iter: int = 100
  kmeans_tol: float = 1e-4
  crf: CRFConfig = CRFConfig()

  def __post_init__(self):
    for name, choices in (("feature", FEATURES), ("fg_prior", FG_PRIORS), ("fusion", FUSIONS),
                          ("descriptor", DESCRIPTORS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"MethodConfig.{name}={getattr(self, name)!r}, expected one of {choices}")
    minimums = dict(dataset_k=2, num_categories=1, num_classes=1, sample_budget=1, kmeans_n_init=1,
                    kmeans_max_iter=1, min_region_area=0)
    for name, minimum in minimums.items():
      if getattr(self, name) < minimum:
        raise ValueError(f"MethodConfig.{name}={getattr(self, name)} must be >= {minimum}")
    if self.num_classes > 254:
      raise ValueError(f"MethodConfig.num_classes={self.num_classes}: label maps are uint8 with 0 = background "
                       "and 255 = ignore, so at most 254 classes")
    if not 0.0 <= self.min_region_fraction < 1.0:
      raise ValueError(f"MethodConfig.min_region_fraction={self.min_region_fraction} must be in [0, 1)")
    if self.kmeans_tol < 0:
      raise ValueError(f"MethodConfig.kmeans_tol={self.kmeans_tol} must be >= 0")
    if self.score_temperature <= 0:
      raise ValueError(f"MethodConfig.score_temperature={self.score_temperature} must be > 0")
    if self.sample_budget < self.num_categories:
      raise ValueError(f"MethodConfig.sample_budget={self.sample_budget} < num_categories={self.num_categories}")

  @classmethod
  def from_mappings(cls, method: Mapping[str, Any], crf: Mapping[str, Any] | None = None) -> "MethodConfig":
    """Builds a config from e.g. `config.method` and `config.crf` of a configs/*.py file.

    Raises:
      ValueError: a key is not a field (naming it), or a value is invalid.
    """
    method, crf = dict(method), dict(crf or {})
    for given, target, label in ((method, cls, "method"), (crf, CRFConfig, "crf")):
      known = {f.name for f in dataclasses.fields(target)} - {"crf"}
      unknown = sorted(set(given) - known)
      if unknown:
        raise ValueError(f"Unknown {label} config field(s) {unknown}; known: {sorted(known)}")
    return cls(**method, crf=CRFConfig(**crf))
