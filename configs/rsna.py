"""Real RSNA 2022 data on accelerators: 384 grid, a larger backbone, bf16 compute.

python train.py --config=configs/rsna.py --config.data.dir=/data/rsna --workdir=runs/rsna
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.data.dir = "/data/rsna-2022-cervical-spine-fracture-detection"
    c.data.grid = 384
    c.data.crop = 1.0  # real fields of view vary too much to assume a centred spine
    c.data.spacing_z = 1.0
    c.data.context = 5
    c.data.num_slices = 32
    c.data.eval_slices = 32
    c.data.workers = 8
    c.data.augment.update(rotate_deg=10.0, scale=0.1, noise=0.02)
    c.model.widths = (32, 64, 128, 256)
    c.model.depths = (2, 2, 3, 3)
    c.model.decoder_width = 64
    c.model.dtype = "bfloat16"
    c.optim.batch_size = 32
    c.optim.steps = 6000
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 300
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.log.every = 50
    return c
