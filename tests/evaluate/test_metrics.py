"""Verification metrics: hand-derived cases, invariances and an independent k-fold re-implementation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from marginface.evaluate.metrics import (
    far_key,
    fold_bounds,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification_metrics,
)


def cos_from_dist(d) -> np.ndarray:
    """Tests are easier to derive on squared distance; offsets of .xx5 keep d off grid points."""
    return 1.0 - np.asarray(d, dtype=np.float64) / 2.0


# --- hand-derived cases -------------------------------------------------------------------------


def test_two_folds_hand_case_uses_lowest_tied_threshold():
    # fold 1 = pairs 0-2, fold 2 = pairs 3-5 (d, same?)
    d = [0.035, 0.405, 0.905, 0.055, 0.705, 1.505]
    same = [True, False, True, True, False, False]
    # Fold 1 trains on {0.055 S, 0.705 D, 1.505 D}: every t in (0.055, 0.705] gets 3/3; the first
    # grid point is 0.06. Test {0.035 S ok, 0.405 D ok, 0.905 S wrong} -> 2/3. (Picking the last
    # tied threshold 0.70 would give 1/3: the tie rule matters here.)
    # Fold 2 trains on {0.035 S, 0.405 D, 0.905 S}: best 2/3, first reached at t=0.04.
    # Test {0.055 S wrong, 0.705 D ok, 1.505 D ok} -> 2/3.
    m = verification_metrics(cos_from_dist(d), same, nfolds=2)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy_std"] == pytest.approx(0.0)
    # Whole set, sorted: 0.035S 0.055S 0.405D 0.705D 0.905S 1.505D -> best 5/6 on (0.055, 0.405].
    assert m["threshold_distance"] == pytest.approx(0.06)
    assert m["threshold"] == pytest.approx(0.97)
    assert m["accuracy_same"] == pytest.approx(2 / 3)  # 0.035, 0.055 accepted; 0.905 not
    assert m["accuracy_diff"] == pytest.approx(1.0)
    # AUC: positives beat 3, 3 and 1 of the 3 negatives -> 7/9.
    assert m["auc"] == pytest.approx(7 / 9)
    # ROC in score order S S D D S D: (0,0) (0,1/3) (0,2/3) (1/3,2/3) ... FAR = FRR = 1/3 there.
    assert m["eer"] == pytest.approx(1 / 3)
    assert m["tar_at_far"] == {}  # 3 negatives: 1e-1 would need 10
    assert m["pos_mean"] == pytest.approx(1 - (0.035 + 0.055 + 0.905) / 6)
    assert m["neg_mean"] == pytest.approx(1 - (0.405 + 0.705 + 1.505) / 6)
    assert m["pairs"] == 6 and m["nfolds"] == 2


def test_leave_one_out_hand_case_accuracy_and_std():
    d = [0.105, 0.305, 0.505, 0.905]
    same = [True, False, True, False]
    # fold 0: train {0.305D, 0.505S, 0.905D} best 2/3 first at t=0.00 -> 0.105 S rejected: 0
    # fold 1: train {0.105S, 0.505S, 0.905D} best 3/3 at t=0.51 -> 0.305 D accepted: 0
    # fold 2: train {0.105S, 0.305D, 0.905D} best 3/3 at t=0.11 -> 0.505 S rejected: 0
    # fold 3: train {0.105S, 0.305D, 0.505S} best 2/3 first at t=0.11 -> 0.905 D rejected: 1
    m = verification_metrics(cos_from_dist(d), same, nfolds=4)
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["accuracy_std"] == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 4))
    assert m["threshold_distance"] == pytest.approx(0.11)  # whole set: 3/4 first on (0.105, 0.305]
    assert m["auc"] == pytest.approx(3 / 4)  # 0.105 beats both negatives, 0.505 beats one


def test_tar_at_far_eer_and_auc_hand_case():
    pos = [0.95, 0.85, 0.65, 0.45, 0.25]
    neg = [0.9, 0.6, 0.55, 0.5, 0.4, 0.35, 0.3, 0.2, 0.1, 0.0]
    scores = pos + neg
    same = [True] * 5 + [False] * 10
    # descending: .95P .9N .85P .65P .6N .55N .5N .45P .4N .35N .3N .25P .2N .1N .0N
    # FAR <= 0.1 allows one false accept (0.9); the most lenient such threshold accepts down to
    # 0.65 -> 3 of 5 positives.
    assert tar_at_far(scores, same) == {"1e-1": pytest.approx(0.6)}
    # negatives below each positive: 10, 9, 9, 6, 3 -> 37 / 50
    assert roc_auc(scores, same) == pytest.approx(37 / 50)
    m = verification_metrics(scores, same)
    assert m["auc"] == pytest.approx(0.74)
    # After accepting .95 .9 .85 .65 .6 .55 .5: FAR = 4/10, TAR = 3/5 -> FRR = 0.4 = FAR.
    assert m["eer"] == pytest.approx(0.4)
    assert set(m["tar_at_far"]) == {"1e-1"}


def test_tied_scores_count_half_and_eer_interpolates():
    # 0.8 P, then a positive and a negative tied at 0.5, then 0.2 N.
    scores, same = [0.8, 0.5, 0.5, 0.2], [True, True, False, False]
    assert roc_auc(scores, same) == pytest.approx((2 + 0.5 + 1) / 4)
    far, tar, thresholds = roc_curve(scores, same)
    np.testing.assert_allclose(far, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tar, [0, 0.5, 1, 1])
    assert thresholds[0] == np.inf and list(thresholds[1:]) == [0.8, 0.5, 0.2]
    # The segment (0, .5) -> (.5, 1) is tar = far + 0.5; it meets tar = 1 - far at far = 0.25.
    assert verification_metrics(scores, same, nfolds=2)["eer"] == pytest.approx(0.25)


# --- broad properties ---------------------------------------------------------------------------


def test_perfect_separation():
    rng = np.random.default_rng(0)
    same = np.tile([True, False], 100)
    scores = np.where(same, rng.uniform(0.6, 0.9, 200), rng.uniform(-0.2, 0.3, 200))
    m = verification_metrics(scores, same)
    assert m["accuracy"] == 1.0 and m["accuracy_std"] == 0.0
    assert m["auc"] == 1.0 and m["eer"] == 0.0
    assert m["accuracy_same"] == 1.0 and m["accuracy_diff"] == 1.0
    assert m["tar_at_far"] == {"1e-1": 1.0, "1e-2": 1.0}
    # the chosen cosine threshold separates the classes
    assert scores[~same].max() < m["threshold"] < scores[same].min() + 0.01


def test_random_scores_give_chance_auc():
    rng = np.random.default_rng(1)
    scores = rng.uniform(-1, 1, 4000)
    same = rng.random(4000) < 0.5
    m = verification_metrics(scores, same)
    assert abs(m["auc"] - 0.5) < 0.03
    assert abs(m["eer"] - 0.5) < 0.03
    assert m["accuracy"] < 0.56


def test_threshold_free_metrics_are_invariant():
    rng = np.random.default_rng(2)
    same = rng.random(500) < 0.4
    scores = np.clip(np.where(same, 0.45, 0.15) + 0.2 * rng.standard_normal(500), -1, 1)
    base = verification_metrics(scores, same)
    perm = rng.permutation(500)
    permuted = verification_metrics(scores[perm], same[perm])
    monotone = verification_metrics(np.tanh(3 * scores) * 0.5, same)
    for other in (permuted, monotone):
        assert other["auc"] == pytest.approx(base["auc"])
        assert other["eer"] == pytest.approx(base["eer"])
        assert other["tar_at_far"] == pytest.approx(base["tar_at_far"])
    assert permuted["pos_mean"] == pytest.approx(base["pos_mean"])
    # swapping which class counts as positive mirrors the AUC; negating scores undoes that
    assert roc_auc(scores, ~same) == pytest.approx(1 - base["auc"])
    assert roc_auc(-scores, ~same) == pytest.approx(base["auc"])


def test_threshold_cosine_and_distance_agree():
    rng = np.random.default_rng(3)
    same = rng.random(301) < 0.5
    scores = np.clip(np.where(same, 0.5, 0.1) + 0.2 * rng.standard_normal(301), -1, 1)
    m = verification_metrics(scores, same)
    assert m["threshold"] == pytest.approx(1 - m["threshold_distance"] / 2)
    grid_index = m["threshold_distance"] / 0.01
    assert grid_index == pytest.approx(round(grid_index))
    accepted = scores > m["threshold"]  # cos > 1 - t/2  <=>  2 - 2cos < t
    assert m["accuracy_same"] == pytest.approx(accepted[same].mean())
    assert m["accuracy_diff"] == pytest.approx((~accepted[~same]).mean())


def test_fold_sizes_follow_sklearn_kfold():
    assert [b - a for a, b in fold_bounds(23, 10)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert fold_bounds(6000, 10)[1] == (600, 1200)
    assert fold_bounds(7, 2) == [(0, 4), (4, 7)]
    bounds = fold_bounds(1001, 10)
    assert bounds[0][0] == 0 and bounds[-1][1] == 1001
    assert all(prev[1] == nxt[0] for prev, nxt in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError, match="folds"):
        fold_bounds(5, 10)


def test_far_targets_need_enough_negatives():
    rng = np.random.default_rng(4)
    same = np.r_[np.ones(200, bool), np.zeros(1000, bool)]
    scores = rng.standard_normal(1200) + same
    tars = verification_metrics(scores, same)["tar_at_far"]
    assert list(tars) == ["1e-1", "1e-2", "1e-3"]
    assert tars["1e-1"] >= tars["1e-2"] >= tars["1e-3"]
    assert far_key(1e-1) == "1e-1" and far_key(1e-6) == "1e-6" and far_key(5e-3) == "5e-3"


def test_roc_curve_shape():
    rng = np.random.default_rng(5)
    same = rng.random(100) < 0.5
    far, tar, thresholds = roc_curve(rng.standard_normal(100), same)
    assert (far[0], tar[0], far[-1], tar[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0) and np.all(np.diff(thresholds) < 0)


def test_results_are_plain_json_numbers():
    m = verification_metrics([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.55, 0.45] * 2, [True, False] * 10)
    json.dumps(m, allow_nan=False)
    assert all(type(v) in (float, int, str, dict) for v in m.values())
    assert all(type(v) is float for v in m["tar_at_far"].values())


# --- input errors and degenerate sets -----------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="differ in length"):
        verification_metrics([0.1, 0.2], [True])
    with pytest.raises(ValueError, match="at least one pair"):
        verification_metrics([], [])
    with pytest.raises(ValueError, match="non-finite"):
        verification_metrics([0.1, float("nan")], [True, False], nfolds=2)
    with pytest.raises(ValueError, match="0/1"):
        verification_metrics([0.1, 0.2], [2, 0], nfolds=2)
    with pytest.raises(ValueError, match="only positive"):
        roc_auc([0.1, 0.2], [True, True])


def test_single_class_gives_nan_auc_but_accuracy():
    m = verification_metrics([0.9, 0.8, 0.7, 0.2], [True] * 4, nfolds=2)
    assert math.isnan(m["auc"]) and math.isnan(m["eer"]) and math.isnan(m["neg_mean"])
    assert math.isnan(m["accuracy_diff"])
    assert m["tar_at_far"] == {}
    # d = 0.2 0.4 | 0.6 1.6. Fold 1 trains on {0.6, 1.6}: first perfect t = 1.61 accepts the test
    # pairs (1/1). Fold 2 trains on {0.2, 0.4}: t = 0.41 rejects 0.6 and 1.6 (0/2). Mean 0.5.
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["threshold_distance"] == pytest.approx(1.61) and m["accuracy_same"] == 1.0


# --- independent re-implementation of insightface's k-fold protocol ---------------------------


def reference_kfold_accuracy(scores, issame, nfolds):
    """Slow loop version, written from the protocol description (no shared code)."""
    dist = [2.0 - 2.0 * float(s) for s in scores]
    labels = [bool(x) for x in issame]
    thresholds = np.arange(0, 4, 0.01).tolist()
    n = len(dist)
    sizes = [n // nfolds + (1 if i < n % nfolds else 0) for i in range(nfolds)]
    starts = [sum(sizes[:i]) for i in range(nfolds)]

    def accuracy(t, idx):
        return sum((dist[i] < t) == labels[i] for i in idx) / len(idx)

    fold_acc = []
    for start, size in zip(starts, sizes):
        test = list(range(start, start + size))
        train = [i for i in range(n) if not start <= i < start + size] if nfolds > 1 else test
        best_t, best_acc = None, -1.0
        for t in thresholds:
            a = accuracy(t, train)
            if a > best_acc:  # strict: the first threshold wins ties
                best_t, best_acc = t, a
        fold_acc.append(accuracy(best_t, test))
    return float(np.mean(fold_acc)), float(np.std(fold_acc))


@pytest.mark.parametrize("n, nfolds, quantized", [(137, 10, False), (90, 10, True), (41, 3, False), (25, 1, True)])
def test_accuracy_matches_slow_reference(n, nfolds, quantized):
    rng = np.random.default_rng(n)
    same = rng.random(n) < 0.5
    scores = np.clip(np.where(same, 0.35, 0.05) + 0.25 * rng.standard_normal(n), -1, 1)
    if quantized:  # scores on a 0.005 grid put many distances exactly on threshold grid points
        scores = np.round(scores / 0.005) * 0.005
    m = verification_metrics(scores, same, nfolds=nfolds)
    ref_mean, ref_std = reference_kfold_accuracy(scores, same, nfolds)
    assert m["accuracy"] == pytest.approx(ref_mean, abs=1e-12)
    assert m["accuracy_std"] == pytest.approx(ref_std, abs=1e-12)


def test_single_class_sets_explain_their_missing_metrics():
    from marginface.evaluate.metrics import verification_metrics

    m = verification_metrics([0.9, 0.8, 0.7, 0.95], [True] * 4, nfolds=2)
    assert np.isnan(m["auc"]) and np.isnan(m["eer"]) and m["tar_at_far"] == {}
    assert "all 4 pairs are same-person pairs" in m["note"] and "AUC, EER and TAR@FAR" in m["note"]
    neg = verification_metrics([0.1, 0.2], [False, False], nfolds=1)
    assert "different-person" in neg["note"]
    assert "note" not in verification_metrics([0.9, 0.1], [True, False], nfolds=1)  # both classes: no note
