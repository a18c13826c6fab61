"""val_at_far: insightface's VAL@FAR protocol (calculate_val in recognition/arcface_torch/eval/verification.py),
computed by hand on a small case, and reported beside the exact-ROC tar_at_far."""
from __future__ import annotations

import numpy as np
import pytest

from marginface.evaluate.metrics import val_at_far, verification_metrics

# Two folds of 4 pairs, as squared distances d = 2 - 2 cos (off the 0.001 grid, so no ties):
#   fold 1: same 0.2005 0.6005, different 0.5005 1.0005
#   fold 2: same 0.3005 0.9005, different 0.4005 1.2005
DIST = np.array([0.2005, 0.6005, 0.5005, 1.0005, 0.3005, 0.9005, 0.4005, 1.2005])
SAME = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)
SCORES = 1.0 - DIST / 2.0


def test_val_at_far_by_hand():
    """FAR target 0.25, fold 1 held out: on fold 2's negatives (0.4005, 1.2005) the FAR of d < t is 0 up to
    t = 0.400 and 0.5 from t = 0.401, so the threshold is interpolated halfway: 0.4005. Fold 1 at it:
    same 0.2005 accepted, 0.6005 not (VAL 1/2); no negative accepted (FAR 0).
    Fold 2 held out: fold 1's negatives give t = 0.5005; fold 2: same 0.3005 yes, 0.9005 no (VAL 1/2);
    different 0.4005 yes, 1.2005 no (FAR 1/2). VAL = 0.5 +- 0, FAR = 0.25.
    Target 0.5: the FAR curve sits at 0.5 on a run of thresholds; the last of the run is taken:
    t = 1.200 (fold 1 held out: VAL 1, FAR 1) and t = 1.000 (fold 2: VAL 1, FAR 1/2)."""
    result = val_at_far(SCORES, SAME, far_targets=(0.25, 0.5), nfolds=2)
    assert result["2e-1"] == pytest.approx({"val": 0.5, "val_std": 0.0, "far": 0.25})
    assert result["5e-1"] == pytest.approx({"val": 1.0, "val_std": 0.0, "far": 0.75})


def test_val_at_far_when_the_target_is_never_reached_and_with_one_fold():
    # one fold trains on itself (insightface's LFold); FAR target 0.25 on negatives 0.5005, 1.0005, 0.4005, 1.2005
    one = val_at_far(SCORES, SAME, far_targets=(0.25,), nfolds=1)
    # the FAR reaches 0.25 at t in (0.4005, 0.5005]: the last grid point of that run is 0.500
    assert one["2e-1"] == pytest.approx({"val": 0.5, "val_std": 0.0, "far": 0.25})
    # every negative further than every grid threshold: FAR never reaches the target, threshold 0 -> nothing accepted
    far_apart = np.r_[np.full(4, 0.9), np.full(4, -1.0)]  # cos -1: d = 4, beyond the grid's 3.999
    labels = np.r_[np.ones(4, bool), np.zeros(4, bool)]
    order = np.array([0, 4, 1, 5, 2, 6, 3, 7])
    assert val_at_far(far_apart[order], labels[order], nfolds=2)["1e-3"] == {"val": 0.0, "val_std": 0.0, "far": 0.0}


def test_reported_beside_tar_at_far():
    rng = np.random.default_rng(0)
    same = np.tile([True, False], 300)
    scores = np.where(same, rng.normal(0.6, 0.15, 600), rng.normal(0.0, 0.15, 600)).clip(-1, 1)
    m = verification_metrics(scores, same)
    assert set(m["val_at_far"]) == {"1e-3"} and set(m["val_at_far"]["1e-3"]) == {"val", "val_std", "far"}
    assert m["val_at_far"] == val_at_far(scores, same)
    # learnt on other folds, VAL sits near the exact-ROC TAR at a comparable FAR
    assert abs(m["val_at_far"]["1e-3"]["val"] - m["tar_at_far"]["1e-2"]) < 0.2
    only_same = verification_metrics(scores[same], same[same])
    assert only_same["val_at_far"] == {}
