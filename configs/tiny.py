"""A seconds-scale configuration for tests: tiny phantoms, grid and network."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.data.phantom.update(num_studies=12, size="tiny", mask_fraction=0.5, box_fraction=0.5)
    c.data.grid = 32
    c.data.region_mm = 120.0  # 3.75 mm pixels: the whole ~110-140 mm tiny field of view on 32
    c.data.spacing_z = 4.0
    c.data.num_slices = 6
    c.data.eval_slices = 6
    c.data.stream.slices = 8
    c.data.test_phantom.num_studies = 4
    c.data.num_folds = 3
    c.model.widths = (8, 16, 24, 32)
    c.model.depths = (1, 1, 1, 1)
    c.model.decoder_width = 8
    c.model.z_width = 16
    c.model.z_heads = 2
    c.optim.batch_size = 4
    c.optim.steps = 8
    c.optim.warmup_steps = 2
    c.checkpoint.every = 4
    c.log.every = 2
    return c
