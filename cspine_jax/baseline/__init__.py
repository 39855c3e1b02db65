"""The two-stage baseline of the training-time benchmark: its networks and losses
(`two_stage`), vertebra-stack data (`vertebrae`), training (`trainer`, which declares its
`systems.System`) and whole-study inference (`predictor`). The core modules never import it."""
