"""Every field of a run, with the paper's recipe as the default.

Roy, Navab & Wachinger (IEEE TMI 2019) blocks in a U-Net trained as in the CHAOS report:
Adam at 0.004 halved every 4 epochs, batch 20, weighted cross entropy plus Dice.

    python launch.py --config configs/default.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.data = data = ml_collections.ConfigDict()
    data.root = ""  # CHAOS tree, case folder or CHAOST2 NIfTI folder; "" = built-in synthetic data
    data.modality = "MR"  # "CT" (liver) or "MR" (liver, kidneys, spleen)
    data.sequences = ("T2SPIR",)  # MR: any of T2SPIR, T1DUAL_InPhase, T1DUAL_OutPhase; CT: ("CT",)
    data.image_size = 256  # training grid side in pixels; divisible by 16
    data.num_folds = 5  # patient-wise folds; the held-out fold is the test set
    data.fold = 0  # which fold is held out for testing
    data.num_val_patients = 1  # patients taken from the training folds for validation
    data.split_seed = 0  # seed of the patient shuffle before the folds are cut
    data.cache_dir = ""  # preprocessed-case cache; "" = $SCSE_JAX_CACHE or ~/.cache/scse_jax
    data.context_slices = 0  # neighbouring slices on either side fed as extra channels (2.5-D); 0 = 2-D
    data.augment = True  # anatomy-respecting augmentation (no left-right flips)
    # With augment: the similarity transforms drawn per example, "small" (rotation 10 degrees,
    # scale 0.9-1.1, shift 6 %) or "wide" (15 degrees, nnU-Net's scale 0.7-1.4, shift 10 %);
    # data/pipeline.py. Measured, not adopted by the CPU recipe: docs/results/mr_t2_cpu_spatial_wide_trial.md.
    data.spatial_augmentation = "small"
    # Train on each class's share of every training-grid pixel (the class indicators resized
    # bilinearly, preprocess.label_shares) instead of the one class resize_labels picks. Measured,
    # not adopted by the CPU recipe: docs/results/recipe.md.
    data.soft_labels = False
    # With augment: "jitter" (contrast and brightness jitter), "nnunet" (nnU-Net's noise, blur,
    # brightness, contrast, low-resolution and gamma transforms) or "gin" (the jitter, then random
    # shallow-network intensity transforms on half of the examples); data/intensity.py.
    data.intensity_augmentation = "jitter"
    # MR, with augment: share of examples whose liver, spleen or both are darkened as iron
    # overload darkens them on T2 (data/intensity.py); 0 = never. Measured, not adopted by the
    # CPU recipe: docs/results/intensity_augmentation.md.
    data.organ_signal_loss = 0.0
    # Epoch 1 starts once a quarter of the training cases are read, shuffling through a buffer
    # of a quarter of the slices; False: epoch 1 waits for all cases and shuffles them fully.
    data.stream_first_epoch = True
    data.synthetic_patients = 8  # patients in the built-in synthetic data
    data.synthetic_size = 128  # slice side of the built-in synthetic data
    data.synthetic_slices = 16  # slices per synthetic volume
    data.max_patients = 0  # use only the first N patients (0 = all); for quick checks

    config.model = model = ml_collections.ConfigDict()
    model.features = 16  # width of the first encoder block; doubles per level
    model.se = "scse"  # "none", "cse", "sse" or "scse"
    model.se_reduction = 2  # channel bottleneck ratio r of cSE
    model.se_aggregation = "max"  # scSE branch combination: "max" (TMI 2019), "add" or "mul"
    model.se_positions = ("encoder", "decoder")  # blocks followed by an SE block; the report's ~2% overhead
    model.upsample = "bilinear"  # decoder upsampling: "bilinear" or "transpose"
    # Train the outputs of the decoder blocks at 1/2 and 1/4 of the side too, through 1x1 heads,
    # against pooled labels (nnU-Net's deep supervision, losses.deep_supervision_loss); predictions
    # use the full-resolution output only. The CPU recipe's: docs/results/mr_t2_cpu_deep_supervision_trial.md.
    model.deep_supervision = False
    model.compute_dtype = "float32"  # "float32" or "bfloat16" (parameters stay float32)
    # Faster CPU training for more memory (models/cpu_ops.py); a step whose temporaries would not
    # fit in 3/4 of the memory falls back to XLA's kernel gradient by itself.
    model.fast_kernel_gradient = True

    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 20  # global batch, split over every device of every host
    train.num_epochs = 20  # epochs to train; a larger value continues a finished run
    # Batches per epoch: 0 = one pass over the training slices; N > 0 = N batches of fresh shuffles,
    # so a run's length and schedule do not grow with its patients (nnU-Net's trainer: 250 batches an epoch).
    train.steps_per_epoch = 0
    train.learning_rate = 0.004  # Adam's initial learning rate
    train.decay_rate = 0.5  # multiplied into the learning rate every decay_epochs
    train.decay_epochs = 4  # epochs between learning-rate decays (staircase)
    train.seed = 0  # parameter initialisation and data order
    train.ce_weight = 1.0  # weight of the class-weighted cross entropy term
    # Cross-entropy class weights: "inverse_frequency" (the report's), "median_frequency"
    # (QuickNAT's) or "none" (plain cross entropy, as nnU-Net pairs with Dice).
    train.class_weighting = "inverse_frequency"
    # Extra cross-entropy weight at label outlines, x the largest class weight (QuickNAT: 2). Measured,
    # not adopted by the CPU recipe: docs/results/mr_t2_cpu_boundary_weight_trial.md.
    train.boundary_weight = 0.0
    train.dice_weight = 1.0  # weight of the soft Dice term
    # Validation, checkpoints' users and inference run an exponential moving average of the
    # parameters with this decay per step (0 = the parameters themselves, as the report); BatchNorm
    # statistics stay those of the live parameters. Measured, not adopted by the CPU recipe:
    # docs/results/intensity_augmentation.md.
    train.ema_decay = 0.0
    train.log_every_steps = 10  # progress line and TensorBoard scalars every N steps

    config.checkpoint = ckpt = ml_collections.ConfigDict()
    ckpt.every_epochs = 1  # save a checkpoint every N epochs (and on SIGTERM/SIGINT)
    ckpt.keep_latest = 2  # latest checkpoints kept, besides the best one

    config.eval = ev = ml_collections.ConfigDict()
    ev.batch_size = 16  # slices per inference call; divisible by the device count
    ev.every_epochs = 1  # validate on whole patients every N epochs
    ev.num_overlays = 3  # validation overlay pictures written at the end
    # Keep each organ's largest 3-D connected component in native-grid results (validation,
    # evaluate --checkpoint, predict, Segmenter); False scores the network's raw output.
    ev.largest_component = False
    # The checkpoint that evaluate --checkpoint, predict, experiment and Segmenter use unless told
    # otherwise: "best" (highest validation Dice, as the report) or "latest" (the end of the
    # schedule; the CPU recipes', docs/results/recipe.md).
    ev.checkpoint = "best"

    config.distributed = dist = ml_collections.ConfigDict()
    dist.coordinator_address = ""  # host:port of process 0; "" = single host or cluster auto-detect
    dist.num_processes = 0  # 0 = from the cluster environment
    dist.process_id = -1  # -1 = from the cluster environment

    return config
