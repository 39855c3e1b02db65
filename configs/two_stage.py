"""The two-stage baseline of the training-time benchmark, on the single model's data.

    python train.py --config=configs/two_stage.py --workdir=runs/two_stage
    python evaluate.py --workdir=runs/two_stage

Stage 1 segments (the single model's backbone and SegDecoder), a pass of it over the training
studies gives every slice its vertebrae, stage 2 classifies vertebra-wise stacks (its own
backbone + BiGRU); see cspine_jax/two_stage_trainer.py. The data section, the segmenter's
network and the optimizer settings are configs/default.py's, so that both systems train on the
same studies, with the same split, grid and network family.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    single = default.get_config()
    c = ml_collections.ConfigDict()
    c.seed = single.seed
    c.data = single.data

    c.model = ml_collections.ConfigDict()
    c.model.family = "two_stage"
    c.model.dtype = single.model.dtype
    c.model.segmenter = ml_collections.ConfigDict(dict(
        widths=single.model.widths, depths=single.model.depths,
        decoder_width=single.model.decoder_width))
    c.model.classifier = ml_collections.ConfigDict(dict(
        widths=(16, 32, 64, 96), depths=(1, 1, 2, 2), hidden=64))  # hidden: GRU width per direction
    # T slices per vertebra, cropped to its box (at least `crop` pixels, `margin` of its side
    # added on each side) and resampled to crop x crop. A vertebra is on a slice where stage 1
    # labels at least `min_area` of it (~5 pixels of 48 x 48). Phantom vertebrae span ~14-28
    # slices of 2 mm (processes included) and ~40 pixels in-plane; a fracture a few slices.
    c.model.stacks = ml_collections.ConfigDict(dict(num_slices=12, crop=48, margin=0.1,
                                                    min_area=0.002))

    # Stage 1 trains on the ~30 % of studies with masks, stage 2 on all of them. At 150 steps
    # (held-out Dice 0.2-0.6) the segmenter's slice sets already overlap the masks' at ~0.6 IoU.
    c.stage1 = ml_collections.ConfigDict()
    c.stage1.optim = single.optim.copy_and_resolve_references()
    c.stage1.optim.update(steps=300, warmup_steps=30)
    c.stage1.loss = ml_collections.ConfigDict(dict(seg_ce=1.0, seg_dice=1.0))
    c.stage1.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=1))
    c.stage2 = ml_collections.ConfigDict()
    c.stage2.optim = single.optim.copy_and_resolve_references()
    # 8 studies a step: each brings 7 vertebra stacks of T slices (672 slices a step); the
    # single model's 64 would make the step 8 times as long.
    c.stage2.optim.update(steps=300, warmup_steps=30, batch_size=8)
    c.stage2.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=2))

    c.log = single.log
    c.distributed = single.distributed
    return c
