"""Real RSNA 2022 data on accelerators: the spine region on a 384 grid, a patch stem, a wider
z-context, bf16 compute.

python train.py --config=configs/rsna.py --config.data.dir=/data/rsna --workdir=runs/rsna
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.data.dir = "/data/rsna-2022-cervical-spine-fracture-detection"
    c.data.grid = 384
    # ~0.39 mm pixels, about the scans' own; room for a large C1 (~90 mm wide) and context.
    # The field of view is held at that pixel size while the spine is found: ~1 GB for 600
    # slices of 250 mm (`preprocess.read_resampled`).
    c.data.region_mm = 150.0
    c.data.spacing_z = 1.0
    c.data.context = 5
    # Few slices of many studies (the fracture map learns from the variety of fractures in a
    # step: configs/default.py's phantom runs), but enough of each study for the z-context to
    # order them: of 8 jittered bins over a typical ~250 mm scan, ~4 fall on C1-C7 (~120 mm).
    c.data.num_slices = 8
    # The checkpoint-picking validation reads each study as a denser sequence (~1 slice per
    # vertebra and more), closer to the final evaluation's every slice.
    c.data.eval_slices = 32
    c.data.workers = 8
    # Only 87 of the 2019 studies have a segmentation, the only teachers of the levels and
    # outlines: x4 makes ~15 % of the draws (~5 studies a step) masked instead of ~4 %.
    c.data.mask_oversample = 4.0
    # The fracture stream can only draw from located studies: the 235 with boxes (~12 %) and
    # the ~1,000 negatives (`pipeline.FracturePool`). Half of 64 boxed adds 32 box slices a
    # step to the bags' few (~4 boxed studies of 32, a box slice or two each), at 64 more
    # 384-pixel slices to the bags' 256.
    c.data.stream.update(slices=64, boxed=0.5)
    c.data.augment.update(rotate_deg=10.0, scale=0.1, noise=0.02)
    c.model.widths = (32, 64, 128, 256)
    c.model.depths = (2, 2, 3, 3)
    c.model.decoder_width = 64
    # 4 x 4 patches then a first stage of stride 1: the same stride-4 first stage as a stride-2
    # stem, without its narrow 192 x 192 output, which is memory-bound and slow for its FLOPs.
    c.model.stem_patch = 4
    c.model.strides = (1, 2, 2, 2)
    # The slice embedding is 2 x 256 + 8 = 520 wide here (200 in the default): 64 would squeeze
    # it 8x, 128 about as much as the default's; 4 heads of 32.
    c.model.z_width = 128
    c.model.dtype = "bfloat16"
    # 32 studies x 8 slices: 256 slices a step, a quarter of the old 32 x 32, so a step is
    # cheaper; steps and learning rate are those tuned for that config, not re-tuned.
    c.optim.batch_size = 32
    c.optim.steps = 6000
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 300
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.log.every = 50
    return c
