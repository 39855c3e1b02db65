"""Study targets: which of C1..C7 are fractured, drawn at the RSNA 2022 prevalence.

Targets are (8,) int64 rows `[patient_overall, C1..C7]` in {0, 1}, in the column order of
`rsna.LABEL_COLUMNS`.
"""

from __future__ import annotations

import itertools

import numpy as np

from cspine_jax.data.rsna import LABEL_COLUMNS, NUM_VERTEBRAE

# RSNA 2022 training set: per-level prevalence C1..C7, and the number of fractured vertebrae
# in a positive study. The "4+" share (3 %) is split 4/5/6 so that the mean count,
# sum(per-level) / patient = 0.715 / 0.476 = 1.502, comes out (1.500).
LEVEL_PREVALENCE = np.array([0.072, 0.141, 0.036, 0.054, 0.080, 0.137, 0.195])
PATIENT_PREVALENCE = 0.476
COUNT_PROBS = {1: 0.65, 2: 0.25, 3: 0.07, 4: 0.015, 5: 0.010, 6: 0.005}
# Multi-level fractures are mostly contiguous: a subset's weight gains exp(1) per adjacent pair.
_ADJACENT_BONUS = 1.0


def _fit_subset_model() -> tuple[np.ndarray, np.ndarray]:
    """Distribution over the 127 non-empty fractured-level subsets of C1..C7.

    P(S) = P(|S|) * prod_{i in S} w_i * exp(bonus * adjacent pairs) / Z_|S|: the count
    distribution is exact by construction and w is fitted by iterative proportional scaling
    so that P(C_i fractured | positive) = prevalence_i / patient prevalence.

    Returns:
      subsets: (127, 7) uint8 indicator rows; probs: (127,) float64, summing to 1.
    """
    subsets = np.array(list(itertools.product((0, 1), repeat=NUM_VERTEBRAE))[1:], np.uint8)
    sizes = subsets.sum(1)
    adjacent = (subsets[:, :-1] & subsets[:, 1:]).sum(1)
    # The marginals of a positive study must sum to the mean count (1.500); the published
    # per-level figures sum to 1.502, so they are matched up to that 0.14 % common factor.
    mean_count = sum(k * p for k, p in COUNT_PROBS.items())
    target = LEVEL_PREVALENCE / LEVEL_PREVALENCE.sum() * mean_count
    log_w = np.zeros(NUM_VERTEBRAE)
    for _ in range(2000):
        score = subsets @ log_w + _ADJACENT_BONUS * adjacent
        probs = np.zeros(len(subsets))
        for k, pk in COUNT_PROBS.items():
            m = sizes == k
            e = np.exp(score[m] - score[m].max())
            probs[m] = pk * e / e.sum()
        marginal = probs @ subsets
        if np.abs(marginal - target).max() < 1e-9:
            break
        log_w += np.log(target / marginal)
    if np.abs(marginal - target).max() > 1e-6:
        raise RuntimeError(f"label model did not converge: {marginal} vs {target}")
    return subsets, probs / probs.sum()


_SUBSETS, _SUBSET_PROBS = _fit_subset_model()


def sample_labels(rng: np.random.Generator) -> np.ndarray:
    """Draw study targets at the RSNA prevalence.

    Returns:
      (8,) int64 `[patient_overall, C1..C7]` in {0, 1}; patient_overall == any(C1..C7).
      The per-level marginals and the fractured-count distribution both match the RSNA
      figures above (`LEVEL_PREVALENCE`, `PATIENT_PREVALENCE`, `COUNT_PROBS`).
    """
    out = np.zeros(len(LABEL_COLUMNS), np.int64)
    if rng.random() < PATIENT_PREVALENCE:
        out[1:] = _SUBSETS[rng.choice(len(_SUBSETS), p=_SUBSET_PROBS)]
        out[0] = 1
    return out
