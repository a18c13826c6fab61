"""1:N identification: chunked top-k search and CMC / TPIR@FPIR against brute force and by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marginface.evaluate.identification import enroll, evaluate_identification, identification_metrics, search

torch.set_num_threads(1)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: full score matrix, sorted by score descending then index ascending."""
    scores = queries @ gallery.T
    k = min(k, gallery.shape[0])
    idx = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])
    return np.take_along_axis(scores, idx, 1), idx


# ------------------------------------------------------------------------------------ search


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_search_matches_brute_force_on_random_data(chunk_size):
    rng = np.random.default_rng(0)
    queries, gallery = rng.standard_normal((23, 16)), rng.standard_normal((150, 16))
    ref_scores, ref_idx = reference_topk(unit(queries), unit(gallery), 5)
    scores, idx = search(queries, gallery, 5, chunk_size=chunk_size, query_batch=6)
    assert scores.shape == idx.shape == (23, 5) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_idx)  # random floats: no ties
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [3, 4, 16, 50])
def test_search_breaks_ties_by_lower_index_across_chunks(chunk_size):
    # Entries ±0.5 in 4-D: every vector has norm exactly 1 and every dot product is an exact
    # multiple of 1/4, so there are many exact ties, also across chunk boundaries.
    rng = np.random.default_rng(1)
    gallery = rng.choice([-0.5, 0.5], size=(50, 4))
    queries = rng.choice([-0.5, 0.5], size=(20, 4))
    ref_scores, ref_idx = reference_topk(queries, gallery, 7)
    assert (ref_scores[:, :, None] == ref_scores[:, None, :]).sum() > 20 * 7  # ties really exist
    scores, idx = search(queries, gallery, 7, chunk_size=chunk_size, query_batch=5)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(scores, ref_scores)


def test_search_tiny_case_by_hand():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    scores, idx = search(np.array([[2.0, 0.0]]), gallery, 3, chunk_size=2)
    # rows 0 and 2 tie at 1.0 (lower index first), then row 1 at 0
    assert idx.tolist() == [[0, 2, 1]] and scores.tolist() == [[1.0, 1.0, 0.0]]
    scores, idx = search(np.array([[0.0, 3.0]]), gallery, 10)  # k > gallery: everything
    assert idx.tolist() == [[1, 0, 2, 3]] and scores.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_search_rejects_bad_input():
    with pytest.raises(ValueError, match="dimensions"):
        search(np.zeros((2, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="k must be"):
        search(np.zeros((2, 3)), np.zeros((4, 3)), 0)


# ------------------------------------------------------------------------------------ enrolment


def test_enroll_averages_unit_features_per_identity():
    feats = np.array([[2.0, 0.0], [0.0, 5.0], [0.0, 3.0], [3.0, 4.0]])
    templates, ids = enroll(feats, ["a", "b", "a", "c"])
    assert ids == ["a", "b", "c"]
    s = 1 / math.sqrt(2)  # a: mean of (1,0) and (0,1), renormalised
    np.testing.assert_allclose(templates, [[s, s], [0, 1], [0.6, 0.8]], atol=1e-7)


# ------------------------------------------------------------------------------------ metrics


def angle(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_cmc_and_tpir_at_fpir_by_hand():
    # Gallery: A from two images at ±20° (template at 0°), B at 90°; distractors at 45° and 180°.
    gallery = np.array([angle(-20), angle(20), angle(90)])
    gallery_ids = ["A", "A", "B"]
    distractors = np.array([angle(45), angle(180)])
    # Mated probes (angle, id) -> mate cosine and rank:
    #   A@10: cos10=.985, best other D45 cos35=.819          -> rank 1
    #   A@40: cos40=.766 < D45 cos5                           -> rank 2
    #   B@60: cos30=.866 < D45 cos15                          -> rank 2
    #   B@100: cos10=.985 > D45 cos55                         -> rank 1
    #   A@290: cos70=.342, all others negative                -> rank 1
    #   A@310: cos50=.643, all others negative                -> rank 1
    # Non-mated top-1: C@200 -> D180 cos20=.940; C@300 -> A cos60=.5; E@135 -> B/D180 cos45=.707.
    probes = [(10, "A"), (40, "A"), (60, "B"), (100, "B"), (200, "C"), (290, "A"), (300, "C"), (310, "A"), (135, "E")]
    feats = np.array([angle(a) for a, _ in probes]) * 3.0  # probe norms do not matter
    ids = [i for _, i in probes]
    m = identification_metrics(feats, ids, gallery, gallery_ids, distractors, ranks=(1, 2, 5),
                               fpir_targets=(0.2, 0.4, 0.7, 1.0), chunk_size=2, query_batch=4)
    assert m["rank_1"] == pytest.approx(4 / 6) and m["rank_2"] == 1.0 and m["rank_5"] == 1.0
    assert m["cmc"] == pytest.approx([4 / 6, 1, 1, 1, 1])
    # FPIR 0.4 of 3 non-mated: 1 false alarm allowed -> threshold = 2nd highest non-mated top-1
    # (.707); rank-1 mates above it: A@10, B@100 -> 2/6. FPIR 0.7: threshold .5 -> + A@310 -> 3/6.
    # FPIR 1.0: no threshold -> all rank-1 mates, 4/6. FPIR 0.2: 0.6 false alarms, not measurable.
    assert set(m["tpir_at_fpir"]) == {"4e-1", "7e-1", "1e0"}
    assert m["tpir_at_fpir"]["4e-1"] == pytest.approx(2 / 6)
    assert m["tpir_at_fpir"]["7e-1"] == pytest.approx(3 / 6)
    assert m["tpir_at_fpir"]["1e0"] == pytest.approx(4 / 6)
    assert m["fpir_thresholds"]["4e-1"] == pytest.approx(math.cos(math.radians(45)), abs=1e-6)
    assert m["fpir_thresholds"]["7e-1"] == pytest.approx(0.5, abs=1e-6)
    assert (m["probes"], m["mated_probes"], m["non_mated_probes"]) == (9, 6, 3)
    assert (m["gallery_identities"], m["distractors"]) == (2, 2)


def test_ties_with_the_mate_count_against_the_probe():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    distractors = np.array([[1.0, 0.0], [0.5, 0.5]])  # an exact copy of X's template
    m = identification_metrics(np.array([[4.0, 0.0], [0.0, 1.0]]), ["X", "Y"], gallery, ["X", "Y"], distractors,
                               ranks=(1, 2), chunk_size=1)
    assert m["cmc"] == [0.5, 1.0]  # X ties with the copy -> rank 2; Y is alone at rank 1
    assert m["tpir_at_fpir"] == {}  # no non-mated probes: open-set rates are not defined


def reference_identification(probes, probe_ids, gallery, gallery_ids, distractors, max_rank, targets):
    """Brute force in float64 with the documented protocol."""
    labels = list(dict.fromkeys(gallery_ids))
    templates = unit(np.stack([unit(gallery)[[g == l for g in gallery_ids]].mean(0) for l in labels]))
    candidates = np.vstack([templates, unit(distractors)])
    scores = unit(probes) @ candidates.T
    mated = np.array([p in labels for p in probe_ids])
    ranks = []
    for i, label in enumerate(probe_ids):
        if label in labels:
            j = labels.index(label)
            others = np.delete(scores[i], j)
            ranks.append(1 + int((others >= scores[i, j]).sum()))
    ranks = np.array(ranks)
    cmc = [float(np.mean(ranks <= r)) for r in range(1, max_rank + 1)]
    top1 = np.sort(scores[~mated].max(1))[::-1]
    mate_scores = np.array([scores[i, labels.index(l)] for i, l in enumerate(probe_ids) if l in labels])
    tpir = {}
    for t in targets:
        allowed = int(math.floor(len(top1) * t + 1e-9))
        if len(top1) * t < 1:
            continue
        thr = -np.inf if allowed >= len(top1) else top1[allowed]
        tpir[t] = float(np.mean((ranks == 1) & (mate_scores > thr)))
    return cmc, tpir


@pytest.mark.parametrize("chunk_size,query_batch", [(5, 3), (13, 100), (65536, 4096)])
def test_metrics_match_brute_force_on_random_data(chunk_size, query_batch, tmp_path):
    rng = np.random.default_rng(2)
    dim, n_ids = 8, 12
    centres = rng.standard_normal((n_ids + 5, dim))
    gallery_ids = [i for i in range(n_ids) for _ in range(2)]  # two images per enrolled identity
    gallery = centres[gallery_ids] + 0.6 * rng.standard_normal((len(gallery_ids), dim))
    probe_ids = list(rng.integers(0, n_ids + 5, size=60))  # ids >= 12 are not enrolled
    probes = centres[probe_ids] + 0.6 * rng.standard_normal((60, dim))
    distractors = rng.standard_normal((47, dim))
    targets = (0.05, 0.1, 0.3)
    m = identification_metrics(probes, probe_ids, gallery, gallery_ids, distractors, ranks=(1, 5, 10),
                               fpir_targets=targets, chunk_size=chunk_size, query_batch=query_batch)
    cmc, tpir = reference_identification(probes, probe_ids, gallery, gallery_ids, distractors, 10, targets)
    assert m["cmc"] == pytest.approx(cmc)
    assert m["rank_1"] == pytest.approx(cmc[0]) and m["rank_5"] == pytest.approx(cmc[4])
    assert 0 < cmc[0] < cmc[9] <= 1  # a non-trivial case
    assert m["tpir_at_fpir"] == pytest.approx({"5e-2": tpir[0.05], "1e-1": tpir[0.1], "3e-1": tpir[0.3]})
    assert m["non_mated_probes"] == sum(p >= n_ids for p in probe_ids)

    # distractors in parts (a folder's features plus a memory-mapped .npy): the same as one matrix
    path = tmp_path / "d.npy"
    np.save(path, distractors[20:].astype(np.float32))
    parts = [distractors[:20], np.load(path, mmap_mode="r")]
    split = identification_metrics(probes, probe_ids, gallery, gallery_ids, parts, ranks=(1, 5, 10),
                                   fpir_targets=targets, chunk_size=chunk_size, query_batch=query_batch)
    assert split["distractors"] == 47 and split["cmc"] == pytest.approx(cmc)
    assert split["tpir_at_fpir"] == pytest.approx(m["tpir_at_fpir"])


def test_evaluate_identification_embeds_with_flip_sum():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    model = lambda x: x.mean(dim=(2, 3)) + torch.tensor([0.0, 0.0, 1.0])  # colour means: flip-invariant
    m = evaluate_identification(model, images[:3], ["a", "b", "c"], images[3:5], ["a", "z"],
                                flip=True, ranks=(1,), fpir_targets=(1.0,))
    assert m["probes"] == 2 and m["mated_probes"] == 1 and m["non_mated_probes"] == 1
    same = evaluate_identification(model, images[:3], ["a", "b", "c"], images[:1], ["a"], ranks=(1,))
    assert same["rank_1"] == 1.0  # a probe identical to its gallery image is found at rank 1
