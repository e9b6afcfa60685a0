"""Fields shared by every segmentation config; each configs/*.py starts from get_base_config()."""

import ml_collections

def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # e.g. --config.seeds=0,1,2,3,4: every seed-dependent pass (levels, refinement, labelling, report) once per
  # seed on the same features, under workdir/seeds/<s>/, plus a mean/std summary in metrics.json.
  # Empty: one run with `seed`. `seed` alone initialises random weights (model.weights="random").
  config.seeds = ()
  config.image_size = 448  # multiple of the patch size
  config.batch_size = 8

  config.model = ml_collections.ConfigDict()
  config.model.variant = "dinov2_vits14"
  config.model.weights = "hf"  # "hf", "meta", a local file, or "random" (smoke runs only: meaningless masks)
  config.model.dtype = "float32"  # "bfloat16" on GPU
  config.model.cache_dir = ""  # default ~/.cache/jaxseg

  config.data = ml_collections.ConfigDict()
  config.data.name = "voc_seg"  # voc_seg, coco_object, folder:/path, skimage
  config.data.split = "val"
  config.data.data_dir = "~/tensorflow_datasets"
  config.data.manual_dir = ""
  config.data.limit = 0  # first N images; 0 = all

  # Every field of jaxseg.framework.MethodConfig (tests/test_configs.py checks both ways).
  config.method = ml_collections.ConfigDict()
  config.method.feature = "k"  # last block's "q", "k", "v" or output "tokens"
  config.method.dataset_k = 2  # clusters of the dataset-level k-means, >= 2
  config.method.fg_prior = "border"  # "border" or "attention": which dataset clusters are foreground
  config.method.num_categories = 20  # image groups of the category level, >= 1 and <= images
  config.method.fusion = "vote"  # "vote" (2 of 3 levels), "intersection" (all 3) or "mean" (mean score)
  config.method.score_temperature = 0.1  # > 0: soft score sigmoid(margin / T); the CRF unary's sharpness
  config.method.descriptor = "crop"  # "crop", "masked" or "pooled" region descriptors
  config.method.min_region_area = 0  # >= 0 pixels; 0 (and min_region_fraction 0): one region per image
  config.method.min_region_fraction = 0.0  # in [0, 1) of the image area; > 0: connected components this large
  config.method.num_classes = 20  # clusters of region descriptors, 1..254
  config.method.sample_budget = 1_000_000  # >= num_categories: patches sampled for the dataset-level k-means
  config.method.kmeans_n_init = 10  # >= 1 k-means++ restarts of every k-means
  config.method.kmeans_max_iter = 100  # >= 1 Lloyd iterations
  config.method.kmeans_tol = 1e-4  # >= 0 relative tolerance (scikit-learn's)

  # Every field of jaxseg.framework.CRFConfig.
  config.crf = ml_collections.ConfigDict()
  config.crf.iterations = 10  # >= 0 mean-field iterations; 0 = no CRF (upsampled probability > 0.5)
  config.crf.gaussian_sxy = 1.0  # > 0 pixels
  config.crf.gaussian_weight = 3.0  # >= 0
  config.crf.bilateral_sxy = 67.0  # > 0 pixels
  config.crf.bilateral_srgb = 3.0  # > 0 colour levels
  config.crf.bilateral_weight = 4.0  # >= 0
  config.crf.canvas_pixels = 3 << 17  # 4096-4194304 pixels per canvas of packed images; no effect on results
  config.crf.max_side = 1024  # >= 0 pixels; larger images are refined at a copy scaled to this side; 0 = never

  config.gallery_size = 48  # images shown in gallery.html, worst first

  # Several hosts (experiments/distributed.py). Empty = one process, unless the environment
  # names a coordinator (JAX_COORDINATOR_ADDRESS) or is a multi-task Slurm / Open MPI job.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""  # "host:port" of process 0
  config.distributed.num_processes = 0  # 0 = from the environment
  config.distributed.process_id = -1  # -1 = from the environment
  return config


def get_dataset_config(variant: str, data_name: str, num_classes: int) -> ml_collections.ConfigDict:
  """The base config for one backbone on one labelled dataset's val split; one category per class."""
  config = get_base_config()
  config.model.variant = variant
  config.data.name = data_name
  config.data.split = "val"
  config.method.num_classes = num_classes
  config.method.num_categories = num_classes
  return config
