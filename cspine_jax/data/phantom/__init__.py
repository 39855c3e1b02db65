"""Procedural CT phantoms of the cervical spine, written in the RSNA 2022 layout.

A phantom is a patient built in millimetres (neck soft tissue, fat, airway, discs and the
vertebrae C1-T2 from signed-distance primitives in each vertebra's own frame), then sampled
on a CT grid with supersampling for partial volume, plus correlated noise and trabecular
texture. Fractures (lucent planes, compression wedges, displaced fragments) and look-alikes
(vascular channels, osteophytes, Schmorl's nodes, a C1 arch cleft, benign wedging, disc
narrowing, facet joints) are placed at the RSNA prevalence, so that a model has to learn the
local morphology of a fracture: per-vertebra global statistics (bone volume, mean HU, height)
are checked not to predict the label (`vertebra_stats`, `shortcut_auc`).

World coordinates are DICOM LPS in mm (x to the patient's left, y posterior, z superior);
volumes are (z, y, x) with axis 0 running from the most superior slice down. Labels: 0
background, 1-7 C1-C7, 8-9 T1-T2 (discs are 0); a voxel takes the vertebra covering the
largest share of it when that share is >= 1/4, so partial-volume cortex that reads as bone is
labelled, as in the real masks.

Sizes (`SIZES`): `tiny` (64^2, ~2 mm pixels, ~4 mm slices, for unit tests), `demo` (128^2,
0.85-1.1 mm pixels, 1.8-2.4 mm slices, ~65-100 slices: a laptop-CPU training set) and
`full` (512^2 (1 in 50 studies 560^2 or 768^2), 0.25-0.4 mm pixels, 200-400 slices of
0.5-1 mm: the real data's size, for latency benchmarks). The same (seed, index) is the same
patient at every size; only the grid, the noise and the demo widening of thin lucencies
(`GAP_WIDENING`) differ. A `Framing` widens a size's field of view and moves the patient off
its centre, as real scans frame the neck (tests of the spine region,
`preprocess.find_spine`); without one the studies are as they always were.

Modules, in dependency order: `labels` (targets at the RSNA prevalence), `shapes`
(signed-distance primitives), `fractures` (lesions and look-alikes), `anatomy` (vertebrae
and discs), `plan` (soft tissue, grid, `plan_study`), `rendering` (`render`), `writer`
(`generate_study`, `write_dataset`), `shortcut` (`vertebra_stats`, `shortcut_auc`).

CLI: `python -m cspine_jax.data.phantom --out DIR --num_studies N --seed S --size demo`.
"""

from cspine_jax.data.phantom.anatomy import LEVELS
from cspine_jax.data.phantom.labels import (
    COUNT_PROBS,
    LEVEL_PREVALENCE,
    PATIENT_PREVALENCE,
    sample_labels,
)
from cspine_jax.data.phantom.plan import (
    GAP_WIDENING,
    SIZES,
    Framing,
    SizeSpec,
    StudyPlan,
    plan_study,
)
from cspine_jax.data.phantom.rendering import render
from cspine_jax.data.phantom.shortcut import STAT_NAMES, shortcut_auc, vertebra_stats
from cspine_jax.data.phantom.writer import Study, dataset_flags, generate_study, write_dataset

# Bumped whenever the same (seed, index, size) starts to give a different study: phantom
# sets cached by `sources.phantom_dir` are keyed by it, so an old set is never reused.
GENERATOR_VERSION = 1

__all__ = [
    "COUNT_PROBS",
    "Framing",
    "GAP_WIDENING",
    "GENERATOR_VERSION",
    "LEVELS",
    "LEVEL_PREVALENCE",
    "PATIENT_PREVALENCE",
    "SIZES",
    "STAT_NAMES",
    "SizeSpec",
    "Study",
    "StudyPlan",
    "dataset_flags",
    "generate_study",
    "plan_study",
    "render",
    "sample_labels",
    "shortcut_auc",
    "vertebra_stats",
    "write_dataset",
]
