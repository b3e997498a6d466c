"""Every configuration field of ocl_jax, with its meaning. Other configs derive from this.

Override any field on the command line, e.g. `--config.batch_size=64`.
Defaults are the paper's MoCo v2 setting (docs/method.md#pretraining) on `scenes`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # What ocl_jax.main does: 'train' (pretraining); 'save_boxes' / 'save_masks' (ContraCAM
  # boxes / masks of contracam.split into the workdir); 'eval_localization' (ContraCAM vs
  # baselines against the true masks and boxes of contracam.eval_split); 'eval' (frozen-encoder
  # evaluations of `evaluation`, one results table); 'pipeline' (pretrain -> ContraCAM ->
  # retrain with OA-crop and BG-mixup -> evaluate, the stages of `pipeline`, resumable).
  c.mode = "train"
  # Seed of everything random: init, data order, augmentation.
  c.seed = 0
  # Contrastive objective: 'moco' (MoCo v2), 'byol' or 'simclr'.
  c.method = "moco"

  # ---- Data ---------------------------------------------------------------
  c.dataset = ml_collections.ConfigDict()
  # TFDS name (with builder config / version), e.g. 'scenes/default', 'coco/2017'; or
  # 'folder:<root>', a local folder of <class>/<image files> (labels: sorted class folders),
  # e.g. 'folder:/data/bg_challenge/original/train'. A folder trains on all of <root>
  # (train_split must be 'train'); any other split (eval_split, contracam.split / eval_split)
  # is the sibling folder of that name, e.g. 'val' -> /data/bg_challenge/original/val.
  # Folder images are keyed by their path below the split folder without extension, '/' ->
  # '__' and spaces -> '_' (ContraCAM box files and <id>.png masks); unreadable files are
  # skipped (training: replaced by other images of the folder), counted and logged.
  c.dataset.name = "scenes/default"
  # TFDS data dir; None = TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)
  c.dataset.train_split = "train"
  # Split the online linear probe is evaluated on during training ('' = none).
  c.dataset.eval_split = "test"
  # Host-side square side every image is resized to (its width/height ratio travels with
  # it): the training batches' unless train_image_size is set, and always the online probe's
  # and the ContraCAM modes' (save_boxes, save_masks, eval_localization).
  c.dataset.image_size = 96
  # Square side of the training batches that on-device augmentation crops; 0 = image_size.
  # Larger keeps small RandomResizedCrop crops sharp at more bytes per image (BENCHMARKS.md,
  # "Host image size and crop sharpness").
  c.dataset.train_image_size = 0
  # tf.data shuffle buffer (examples).
  c.dataset.shuffle_buffer = 10_000

  # ---- On-device augmentation per view (docs/method.md#pretraining) ------
  c.augment = ml_collections.ConfigDict()
  c.augment.crop_size = 96  # output side of each view (pixels)
  c.augment.scale = (0.08, 1.0)  # RandomResizedCrop area fraction range
  c.augment.ratio = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio range (w/h, pixels)
  c.augment.flip_prob = 0.5  # horizontal flip probability
  c.augment.jitter_prob = 0.8  # probability of colour jitter
  c.augment.brightness = 0.4  # colour jitter strengths (torchvision semantics)
  c.augment.contrast = 0.4
  c.augment.saturation = 0.4
  c.augment.hue = 0.1
  c.augment.grayscale_prob = 0.2  # random grayscale probability
  c.augment.blur_prob = 0.5  # Gaussian blur probability
  c.augment.blur_sigma = (0.1, 2.0)  # blur sigma range (pixels)
  c.augment.blur_kernel_frac = 0.1  # blur kernel side as a fraction of crop_size (made odd)

  # ---- Object-aware random crop, OA-crop (docs/method.md#oa-crop) --------------
  # Each image carries up to max_boxes boxes; per step one is chosen uniformly and
  # both views take their RandomResizedCrop inside it (scale/ratio relative to the
  # box). Images with no box use the whole image.
  c.object_aware = ml_collections.ConfigDict()
  c.object_aware.crop = False  # True: OA-crop on
  # 'gt': the dataset's objects/bbox (scenes, coco/2017); otherwise the path of a box
  # file in the release format (`IMAGE_ID x1,y1,x2,y2 ...`), e.g. the ContraCAM boxes
  # written by --config.mode=save_boxes (WORKDIR/boxes_train.txt).
  c.object_aware.boxes = "gt"
  c.object_aware.max_boxes = 16  # K: boxes kept per image (the first K)
  c.object_aware.gt_min_area = 0.01  # 'gt': keep instances whose box area is > this fraction
  c.object_aware.gt_margin = 0.2  # 'gt': expand each box by this fraction of (w, h) per side
  # Box file: False = malformed lines and training images missing from the file are
  # errors; True = they are counted and logged, and those images use the whole image.
  c.object_aware.tolerate_box_errors = False

  # ---- Background mixup (docs/method.md#bg-mixup), on view 1 after colour augmentation ----
  c.bg_mixup = ml_collections.ConfigDict()
  c.bg_mixup.enabled = False
  c.bg_mixup.masks = "gt"  # 'gt' (the dataset's `mask`) or a folder of mask PNGs
  # named <image id>.png (written by --config.mode=save_masks)
  c.bg_mixup.prob = 0.4  # probability per image
  c.bg_mixup.threshold = 0.2  # hard foreground = mask >= threshold
  c.bg_mixup.fifo_size = 50  # backgrounds kept for images whose donor has none

  # ---- Mixup / CutMix contrastive baselines (docs/method.md#mixup-cutmix; MoCo only) ----
  # View 1 is mixed with a permuted batch; the loss credits both sources' keys.
  c.mix = ml_collections.ConfigDict()
  c.mix.kind = "none"  # 'none' | 'mixup' (lambda per image) | 'cutmix' (per batch)
  c.mix.alpha = 1.0  # lambda ~ Beta(alpha, alpha), then max(lambda, 1 - lambda)

  # ---- Saliency-guided contrastive learning, SGCL (docs/method.md#sgcl) ----------------
  # The model's own saliency, computed inside the train step: ContraCAM (T=1) of the target
  # (EMA) network on the un-augmented image (SimCLR: the online network), stop-gradient.
  c.saliency = ml_collections.ConfigDict()
  c.saliency.enabled = False
  c.saliency.resolution = 48  # side the image is resized to for ContraCAM (half size)
  c.saliency.expand_res = 2  # ContraCAM's stride-1 layer4 (1, 2, 4): keeps its map >= 3x3
  c.saliency.map_size = 8  # saliency grid side (ContraCAM's map is block-averaged to it;
  # must divide resolution): centres and crop scores use it
  # Maps are recomputed when older than this many steps; > 1 keeps one map per training image
  # in the train state (a bank of N x map_size^2 bfloat16) and reuses it in between.
  c.saliency.every_k_steps = 1
  # Crop centres drawn from saliency^crop_temperature (1 = s / sum s; larger = sharper); the crop
  # keeps its RandomResizedCrop size and is shifted inside the image. 0 = plain RandomResizedCrop.
  c.saliency.crop_temperature = 1.0
  # Pair weight ∝ (a_u a_v)^gamma with a_v the mean saliency inside crop v, normalised to mean 1
  # over the global batch; the loss is sum(w l) / sum(w). 0 = the unweighted loss.
  c.saliency.gamma = 1.0
  c.saliency.num_local_crops = 0  # M small crops besides the 2 global ones (multi-crop)
  c.saliency.local_crop_size = 48  # their side (pixels)
  c.saliency.local_scale = (0.05, 0.4)  # their RandomResizedCrop area range
  # 'gt': also load the dataset's true foreground masks (scenes' `mask`) to log the rank
  # correlation of crop-pair saliency with true object coverage (sgcl_score_coverage_spearman).
  c.saliency.coverage_masks = ""
  c.saliency.picture_images = 8  # images in WORKDIR/saliency.png (maps with crops; 0 = off)

  # ---- Model ----------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.arch = "resnet18"  # resnet10 | resnet18 | resnet34 | resnet50
  c.model.width = 64  # channels of the first stage (64 = standard ResNet)
  c.model.small_stem = False  # 3x3 stride-1 stem, no max-pool (small images)
  c.model.proj_hidden_dim = 0  # projector hidden width; 0 = the encoder's feature dim
  c.model.proj_dim = 128  # embedding dim (MoCo/SimCLR 128, BYOL 256)
  c.model.pred_hidden_dim = 4096  # BYOL predictor hidden width (used by byol only)
  # Projector Linear(no bias)-BN-ReLU-Linear (the release's); False: Linear(bias)-ReLU-Linear,
  # MoCo v2's, the layout its published checkpoints import into (docs/method.md#release-quirks)
  c.model.proj_batch_norm = True
  c.model.dtype = (
      "float32"  # compute dtype: float32 | bfloat16 (params, embeddings, loss stay float32)
  )

  # ---- Objectives ---------------------------------------------------------------
  c.moco = ml_collections.ConfigDict()
  c.moco.temperature = 0.2
  c.moco.queue_size = 65_536  # negatives; must be a multiple of batch_size
  c.moco.momentum = 0.999  # EMA of the key encoder
  c.byol = ml_collections.ConfigDict()
  c.byol.momentum = 0.996  # EMA of the target network (fixed, as the release)
  c.simclr = ml_collections.ConfigDict()
  c.simclr.temperature = 0.2

  # ---- Optimisation ----------------------------------------------------------------
  c.batch_size = 256  # GLOBAL batch over all devices and processes
  c.num_epochs = 800
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"  # sgd | lars
  c.optim.base_lr = 0.03  # lr = base_lr * batch_size / 256
  c.optim.final_lr = 1e-3  # cosine decays to this absolute lr
  c.optim.warmup_steps = 0
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.lars_trust_coefficient = 1e-3

  # ---- Online linear probe (stop-gradient features, its own Adam) ---------------------
  c.probe = ml_collections.ConfigDict()
  c.probe.enabled = True
  c.probe.learning_rate = 1e-3
  c.probe.eval_batches = 16  # batches of eval_split per probe evaluation (-1 = all)

  # ---- ContraCAM (docs/method.md#contracam, #boxes-and-masks) ---------------------
  c.contracam = ml_collections.ConfigDict()
  c.contracam.checkpoint = ""  # training workdir or encoder export; '' = --workdir
  c.contracam.split = "train"  # split whose boxes / masks are saved
  c.contracam.eval_split = "test"  # split with ground truth for eval_localization
  c.contracam.iterations = 10  # T for boxes (iterative refinement)
  c.contracam.mask_iterations = 1  # T for background masks
  c.contracam.expand_res = 2  # 1 | 2 | 4: stride-1 layer4 (and layer3) for finer maps
  # True: the release's score; False: the per-image form of docs/method.md#contracam (the
  # same maps at T=1, a few % apart from the second step on; docs/method.md#release-quirks).
  # The paper's configs (coco*, in9*) set True.
  c.contracam.official_score = False
  c.contracam.batch_size = 64  # images per ContraCAM batch (they are each other's negatives)
  c.contracam.max_images = -1  # limit on images processed (-1 = the whole split)
  c.contracam.clean_threshold = 0.5  # binarisation of maps before connected components
  c.contracam.box_min_obj_scale = 0.01  # components smaller than this fraction are dropped (boxes)
  c.contracam.eval_min_obj_scale = 0.001  # ... (evaluation masks)
  c.contracam.box_threshold = 0.5  # boxes: threshold at this fraction of the map maximum
  c.contracam.box_min_area = 0.01  # boxes: minimum box area as a fraction of the image
  c.contracam.box_margin = 0.2  # boxes: expanded by this fraction of (w, h) per side
  c.contracam.largest_box_only = False
  # Dense CRF on each map before cleaning (docs/method.md#boxes-and-masks): the release's
  # --apply_crf, which its paper commands use for boxes. crf: the maps of save_boxes and of
  # eval_localization (every row); crf_masks: also the soft masks of save_masks (the
  # release's save_mask ignores --apply_crf). The release's parameters, in pixels of the
  # host-resized image (dataset.image_size) and 0-255 colour units:
  c.contracam.crf = False
  c.contracam.crf_masks = False
  c.contracam.crf_iterations = 5  # mean-field steps
  c.contracam.crf_gaussian_sxy = 3.0  # position kernel: width (pixels)
  c.contracam.crf_gaussian_compat = 3.0  # ... and Potts weight
  c.contracam.crf_bilateral_sxy = 80.0  # bilateral kernel: position width (pixels)
  c.contracam.crf_bilateral_srgb = 13.0  # ... colour width (0-255 per channel)
  c.contracam.crf_bilateral_compat = 10.0  # ... and Potts weight
  c.contracam.num_pictures = 8  # images in the ContraCAM picture grid

  # ---- Frozen-encoder evaluation (docs/method.md#evaluation): --config.mode=eval, pipeline ----
  c.evaluation = ml_collections.ConfigDict()
  # Encoder exports or training workdirs to evaluate ('' entries / empty = --workdir).
  c.evaluation.checkpoints = ()
  # Datasets by name: scenes (all its test splits; the scenes config of dataset.name),
  # coco_crop, caltech_birds2011, oxford_flowers102, food101, oxford_iiit_pet, cifar10,
  # cifar100 (TFDS), imagenet9, objectnet9, si_score (image folders below), folder:<path>.
  c.evaluation.datasets = ("scenes",)
  # L-BFGS linear probe with an L2 sweep; weighted kNN; probe-free feature measures (`scenes`
  # only: ocl_jax/evaluation/scene_features.py)
  c.evaluation.protocols = ("linear", "knn", "feature")
  c.evaluation.image_size = 96  # side of the centre crop fed to the encoder
  c.evaluation.crop_fraction = 1.0  # resize the shorter side to image_size / crop_fraction first
  # (0.875 is the usual ImageNet protocol; 1.0 keeps scenes whole)
  c.evaluation.batch_size = 256  # global feature-extraction batch
  c.evaluation.max_examples = -1  # cap on examples per split (-1 = all)
  c.evaluation.num_l2_values = 45  # L2 weights log-spaced over 1e-6 .. 1e5, chosen on val
  c.evaluation.lbfgs_max_iters = 1000
  c.evaluation.knn_k = 20
  c.evaluation.knn_temperature = 0.07
  c.evaluation.data_dir = ml_collections.config_dict.placeholder(
      str
  )  # TFDS dir; None = dataset.data_dir
  c.evaluation.folders = ml_collections.ConfigDict()
  c.evaluation.folders.imagenet9 = ""  # the bg_challenge folder (original/, mixed_rand/, ...)
  c.evaluation.folders.objectnet9 = ""  # <root>/<class>/*, the 9 ImageNet-9 classes
  c.evaluation.folders.si_score = ""  # <root>/<factor>/<class>/*

  # ---- The debiasing pipeline (--config.mode=pipeline; ocl_jax/pipeline.py) ----
  c.pipeline = ml_collections.ConfigDict()
  # In order: vanilla pretraining, ContraCAM boxes + masks of the vanilla model, OA-crop and
  # BG-mixup retraining, SGCL pretraining with the config's `saliency` settings (all at the
  # same steps), evaluation of every trained model.
  c.pipeline.stages = ("vanilla", "contracam", "oacrop", "bgmix", "sgcl", "eval")
  c.pipeline.oacrop_boxes = "contracam"  # 'contracam' (the contracam stage) or 'gt'
  c.pipeline.bgmix_masks = "contracam"  # 'contracam' or 'gt'
  c.pipeline.localization = True  # eval: ContraCAM (T=1) mIoU of every model
  c.pipeline.localization_images = 500  # ... on this many images of contracam.eval_split

  # ---- Several seeds of the pipeline (--config.mode=study; ocl_jax/study.py) ------------
  c.study = ml_collections.ConfigDict()
  c.study.seeds = (0, 1, 2, 3, 4)  # one pipeline per seed, in WORKDIR/seed_<s>
  c.study.baseline = "vanilla"  # paired differences are taken against this model
  c.study.metrics = (  # the columns of results/scenes_study.{json,md,png}
      "scenes/linear/test",
      "scenes/linear/mixed_rand",
      "scenes/linear/bg_gap",
      "scenes/linear/only_fg",
      "scenes/knn/test",
      "scenes/knn/bg_gap",
      "scenes/feature/mixed_rand_top1",
      "scenes/feature/mixed_rand_consistency",
      "scenes/feature/only_fg_top1",
      "scenes/feature/only_fg_class_p20",
      "loc/mask_miou",
  )
  c.study.results_dir = ""  # where scenes_study.* go ('' = WORKDIR)
  c.study.label = ""  # the config's name, recorded in the results (e.g. configs/scenes_study.py)
  # A rounding-level rerun of one study seed (e.g. the main job with --cpu_devices=1), whose
  # distance to that seed says how stable each metric is ('' = none).
  c.study.perturbed = ""
  c.study.perturbed_seed = 0
  c.study.perturbed_description = "one JAX device instead of one per core"

  # ---- Logging, checkpoints, export ----------------------------------------------------
  c.log_every_steps = 50
  c.eval_every_steps = 500  # online-probe evaluation on dataset.eval_split (0 = off)
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3  # newest N checkpoints kept in workdir/checkpoints
  c.export_encoder = True  # write workdir/export (encoder only) at the end
  # A step whose loss or gradients are NaN/inf is never applied. 'stop': the run stops with
  # an error naming the step (the last good checkpoint is kept); 'skip': it goes on, counting
  # skipped steps (logged as skipped_steps).
  c.nonfinite = "stop"
  # Before each checkpoint: a parameter norm grown more than this many times since the last
  # checkpoint (a blow-up with finite weights, e.g. a far too large learning rate) stops the
  # run without saving, keeping the good checkpoints (ocl_jax/train/divergence.py; 0 = off).
  c.max_param_norm_growth = 100.0
  c.view_pictures = 8  # images of the first batch drawn to WORKDIR/views.png (0 = off)
  c.prefetch_to_device = 2  # batches staged on device ahead of the step
  # Host batches read by a background thread ahead of the step (ocl_jax/data/prefetch.py), so
  # the next epoch's pipeline is built while queued steps run; 0 reads in the loop's thread.
  c.host_prefetch = 4
  return c
