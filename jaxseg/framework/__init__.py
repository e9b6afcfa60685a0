"""The multilevel clustering method: dataset, category and image levels, fusion, refinement, labeling.

Pure stage functions (arrays and a static MethodConfig in, arrays out); the
runner composes them streaming over a split, `segment_features` composes them
in memory. See docs/design.md, stages 0-6.
"""

from jaxseg.framework.config import CRFConfig
from jaxseg.framework.config import MethodConfig
from jaxseg.framework.features import PatchFeatures
from jaxseg.framework.features import border_patches
from jaxseg.framework.features import patch_features
from jaxseg.framework.features import unit_length
from jaxseg.framework.fusion import fuse
from jaxseg.framework.fusion import level_scores
from jaxseg.framework.labeling import assign_classes
from jaxseg.framework.labeling import crop
from jaxseg.framework.labeling import fit_classes
from jaxseg.framework.labeling import label_map
from jaxseg.framework.labeling import pooled_descriptors
from jaxseg.framework.labeling import region_boxes
from jaxseg.framework.labeling import region_patch_fractions
from jaxseg.framework.labeling import region_patch_masks
from jaxseg.framework.labeling import regions
from jaxseg.framework.levels import ClusterStats
from jaxseg.framework.levels import DatasetLevel
from jaxseg.framework.levels import LevelMargins
from jaxseg.framework.levels import accumulate_stats
from jaxseg.framework.levels import assign_categories
from jaxseg.framework.levels import category_sample_init
from jaxseg.framework.levels import dataset_cluster_stats
from jaxseg.framework.levels import dataset_level
from jaxseg.framework.levels import dataset_margins
from jaxseg.framework.levels import fit_categories
from jaxseg.framework.levels import fit_category_prototypes
from jaxseg.framework.levels import fit_dataset_centroids
from jaxseg.framework.levels import foreground_clusters
from jaxseg.framework.levels import image_prototypes
from jaxseg.framework.levels import level_margins
from jaxseg.framework.levels import pair_margins
from jaxseg.framework.levels import sample_category_patches
from jaxseg.framework.levels import sample_patches
from jaxseg.framework.levels import spherical_kmeans
from jaxseg.framework.levels import split_from_parent
from jaxseg.framework.compose import MultilevelResult
from jaxseg.framework.compose import PASS_KEYS
from jaxseg.framework.compose import capped_budget
from jaxseg.framework.compose import effective_method
from jaxseg.framework.compose import fit_category_level
from jaxseg.framework.compose import fit_dataset_level
from jaxseg.framework.compose import image_level_and_fusion
from jaxseg.framework.compose import batches
from jaxseg.framework.compose import label_pooled
from jaxseg.framework.compose import pass_key
from jaxseg.framework.compose import scores_and_probability
from jaxseg.framework.compose import segment_features
from jaxseg.framework.config import CRFParams
from jaxseg.framework.config import RefineOptions
from jaxseg.framework.refine import Refiner
from jaxseg.framework.refine import RefineItem
from jaxseg.framework.refine import refine
from jaxseg.framework.refine import refine_batch
from jaxseg.framework.refine import refine_stream
from jaxseg.framework.refine_resize import FG_LEVELS
from jaxseg.framework.refine_resize import downscaled_size
from jaxseg.framework.refine_resize import level_stats
from jaxseg.framework.refine_resize import unary_from_prob
from jaxseg.framework.refine_resize import upsample
