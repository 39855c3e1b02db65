"""The embedded default: synthetic phantoms, trained on a laptop CPU in minutes.

python train.py                        # generates phantoms once, trains, evaluates
python train.py --config.data.dir=/path/to/rsna   # the same on real data
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameters, data order and the train/held-out split

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # RSNA-layout folder; empty: generate phantoms (below) once and reuse them
    c.data.cache_dir = ""  # prepared cache; empty: $CSPINE_CACHE/prepared-<hash of data + grid>
    # The generated phantoms (`cspine_jax.data.phantom`) when data.dir is empty: how many, their
    # seed, size ('tiny', 'demo', 'full'), and the shares of studies with a mask and with boxes.
    c.data.phantom = ml_collections.ConfigDict(
        dict(num_studies=240, seed=0, size="demo", mask_fraction=0.3, box_fraction=1.0)
    )
    # The test set: studies nothing is trained, chosen or thresholded on; the run ends by
    # scoring them beside the held-out fold (test_metrics.json). test_dir: an RSNA-layout
    # folder with labels; empty, on phantoms: `test_phantom` studies of another seed, made
    # once like the training phantoms (same size and shares); num_studies 0: none.
    c.data.test_dir = ""
    c.data.test_phantom = ml_collections.ConfigDict(dict(num_studies=100, seed=1000))
    c.data.grid = 96  # in-plane pixels after resize (H = W)
    # What the G x G grid shows (`cspine_jax.data.preprocess`): 'spine', a region_mm square
    # around the vertebral column found in each study (no labels needed), at region_mm / grid
    # mm pixels whatever the field of view; 'centre', the central `crop` fraction of the field
    # of view (what runs before the spine region were trained on). 100 mm holds C1-C7 with its
    # processes (up to ~94 mm wide on the phantoms, C1's transverse processes) at ~1.04 mm
    # pixels, within the demo phantoms' 0.85-1.1 mm.
    c.data.region = "spine"
    c.data.region_mm = 100.0  # side of the spine region (region 'spine')
    c.data.crop = 0.75  # central fraction of the field of view kept (region 'centre')
    c.data.spacing_z = 2.0  # mm between prepared slices
    c.data.windows = ((400.0, 1800.0), (40.0, 400.0))  # (centre, width) HU: bone, soft tissue
    c.data.context = 3  # K adjacent slices stacked as channels
    # S slices drawn along z per training example (one per equal bin, jittered): the
    # z-context reads them as a sequence, so it needs several per study, while the fracture
    # map learns from the variety of fractures in a step (before z-context, held-out patient
    # AUC after 400 steps of 128 slices: 8 studies x 16 slices 0.40, 32 x 4 0.60, 64 x 2 0.70).
    # With z-context, 16 x 8: 0.48, 32 x 4: 0.71 (benchmarks/RESULTS.md). With fracture_focus
    # 1 the bag of a study with boxes always holds a slice of its fracture.
    c.data.num_slices = 4
    # S of the validation that picks the best checkpoint; the final evaluation reads every slice.
    c.data.eval_slices = 16
    c.data.num_folds = 5  # stratified folds of the studies; one is held out
    c.data.fold = 0  # held-out fold
    c.data.workers = 0  # grain worker processes (0: in the main process)
    c.data.positive_oversample = 1.0  # sampling weight multiplier of positive studies
    # ... and of studies with a segmentation: the only ones that teach the levels and the
    # vertebrae's outlines (30 % of the phantoms, 4 % of the real training set).
    # Twice their share (30 % -> ~46 % of the bags) is what lets C1 and C7 be told apart.
    c.data.mask_oversample = 2.0
    c.data.fracture_focus = 1.0  # chance a z bin holding boxed slices samples one of them
    # The fracture stream (`pipeline.FracturePool`): besides the study bags, `slices` slices a
    # step (global; a multiple of optim.batch_size) drawn independently across every training
    # study whose fractures are located (boxes, or a negative study), a share `boxed` of them
    # touched by a box, the others negatives (look-alikes, intact levels). They train the
    # fracture map through the same backbone and decoder, in the same step. The map alone
    # learns from such slices (benchmarks/fracture_detector.py) and stayed at chance fed
    # only whole-study bags (2 studies x 16 slices).
    c.data.stream = ml_collections.ConfigDict(dict(slices=32, boxed=0.5))
    # Without the in-plane warp (applied in the train step: `cspine_jax.augment`) a slice
    # classifier memorises the 192 training studies within ~300 steps and stays at chance on
    # held-out ones. flip: left-right; rotate_deg, scale, shift (fraction of the grid): the
    # warp's ranges; intensity: contrast/brightness jitter; noise: SD of added noise.
    c.data.augment = ml_collections.ConfigDict(
        dict(flip=True, rotate_deg=15.0, scale=0.1, shift=0.06, intensity=0.05, noise=0.01)
    )

    c.model = ml_collections.ConfigDict()
    c.model.family = "single"  # 'single': this model; 'two_stage': the baseline (two_stage.py)
    c.model.widths = (16, 32, 64, 96)  # channels of the backbone stages
    c.model.depths = (1, 1, 2, 2)  # residual blocks per stage
    c.model.decoder_width = 32  # widest level of the segmentation decoder
    c.model.dtype = "float32"  # compute dtype; bfloat16 on accelerators (params stay float32)
    # The stem (`backbone.Backbone`): 0, a 3x3 conv of stride 2; p > 0, p x p patches
    # (space-to-depth) then a 3x3 conv. Stride of each stage's first block: after a stride-2
    # stem, stages run at strides 4, 8, 16, 32. The segmentation is at stride 2 either way.
    c.model.stem_patch = 0
    c.model.strides = (2, 2, 2, 2)
    # The input image into the decoder's finest level (`heads.SegDecoder`), as
    # space-to-depth patches: the fracture map sees the 1-4 mm gaps at the input's pixels.
    c.model.image_skip = False
    c.model.norm_group_size = 16  # GroupNorm channels per group (at least one group)
    # z-context (`heads.ZContext`): transformer blocks along z over the slice embeddings of a
    # study, giving each slice its levels and per-level fracture logits; 0 layers: none.
    c.model.z_width = 64
    c.model.z_layers = 2
    c.model.z_heads = 4
    c.model.presence_window = 3  # side of the mean filter before the max giving presence
    c.model.detach_presence = True  # no gradient from the fracture losses into presence
    # No gradient from the study and slice losses into the fracture map through its
    # strongest pixels (`heads.fracture_evidence`): the map learns from its pixel losses.
    c.model.detach_map = True

    # Weights of the loss terms (`models.single.compute_loss`): the competition's weighted log
    # loss, segmentation CE and Dice and the slices' level BCE (masked studies), per-slice BCE
    # and the fracture map's pixel BCE (studies with boxes, and negative studies), the map's
    # pixel BCE on the fracture stream.
    c.loss = ml_collections.ConfigDict(
        dict(
            study=1.0, seg_ce=1.0, seg_dice=1.0, level=1.0, slice=1.0, fracture_map=1.0, stream=1.0
        )
    )

    c.optim = ml_collections.ConfigDict()
    c.optim.batch_size = 32  # global, studies per step
    c.optim.grad_accum = 1  # micro-batches a step's gradient is averaged over
    c.optim.steps = 400  # training steps
    c.optim.lr = 2e-3  # peak AdamW learning rate, after linear warm-up, then cosine decay
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 1e-4  # AdamW decoupled weight decay
    c.optim.clip_norm = 1.0  # global gradient-norm clipping

    # A checkpoint every `every` steps, each after a held-out evaluation (val_loss picks the
    # best); the `keep` latest and the best are kept.
    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=2))
    # Training metrics averaged over `every` steps; images: a segmentation picture per eval.
    c.log = ml_collections.ConfigDict(dict(every=20, images=True))
    # Several hosts: the coordinator's HOST:PORT, the process count and this process's index.
    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0))
    return c
