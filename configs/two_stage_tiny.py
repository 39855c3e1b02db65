"""A seconds-scale two-stage configuration for tests: configs/tiny.py's data and sizes."""

import ml_collections

from configs import tiny, two_stage


def get_config() -> ml_collections.ConfigDict:
    small = tiny.get_config()
    c = two_stage.get_config()
    c.data = small.data
    c.model.segmenter.update(
        widths=small.model.widths,
        depths=small.model.depths,
        decoder_width=small.model.decoder_width,
    )
    c.model.classifier.update(widths=(8, 16), depths=(1, 1), hidden=8)
    c.model.stacks.update(num_slices=4, crop=16)
    for stage in (c.stage1, c.stage2):
        stage.optim.update(batch_size=4, steps=4, warmup_steps=1)
        stage.checkpoint.update(every=2)
    c.log = small.log
    return c
