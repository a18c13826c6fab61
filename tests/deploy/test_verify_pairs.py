"""verify_pair_list with a stand-in embedder: the scoring and bookkeeping around
the model (thresholds, labels, relative paths, metrics), independent of any network."""
import numpy as np
import pytest

from marginface.deploy.verify import verify_pair_list
from marginface.errors import UserError


class VectorsByName:
    """An embedder whose embedding of ``x.png`` is the unit vector stored for ``x``."""

    threshold, threshold_source = 0.5, "test"

    def __init__(self, vectors):
        self.vectors = {k: np.asarray(v, np.float32) / np.linalg.norm(v) for k, v in vectors.items()}

    def embed_many(self, paths):
        return np.stack([self.vectors[p.stem if hasattr(p, "stem") else str(p).rsplit(".", 1)[0]] for p in paths])


def _folder(tmp_path, names, rows):
    for n in names:
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / f"{n}.png").write_bytes(b"not read by the stand-in")
    (tmp_path / "pairs.csv").write_text("file_x,file_y,Decision\n" + "".join(f"img/{a}.png,img/{b}.png,{d}\n"
                                                                           for a, b, d in rows))
    return tmp_path / "pairs.csv"


def test_pairs_are_scored_decided_and_evaluated(tmp_path):
    vectors = {"a1": [1, 0, 0], "a2": [0.9, 0.1, 0], "b1": [0, 1, 0], "b2": [0.1, 1, 0.2], "c1": [0.6, 0.8, 0]}
    rows = [("a1", "a2", "Yes"), ("b1", "b2", "Yes"), ("a1", "b1", "No"), ("a2", "c1", "No"), ("b2", "c1", "Yes")]
    result = verify_pair_list(VectorsByName(vectors), _folder(tmp_path, vectors, rows), nfolds=10)
    emb = VectorsByName(vectors).vectors
    sims = [float(emb[a] @ emb[b]) for a, b, _ in rows]
    assert [r["a"] for r in result["pairs"]] == [f"img/{a}.png" for a, _, _ in rows]  # relative to the CSV
    assert [r["similarity"] for r in result["pairs"]] == pytest.approx(sims, abs=1e-6)
    assert [r["same"] for r in result["pairs"]] == [s > 0.5 for s in sims]
    assert [r["label"] for r in result["pairs"]] == [d == "Yes" for *_, d in rows]
    ev = result["eval"]
    expected_acc = np.mean([(s > 0.5) == (d == "Yes") for s, (*_, d) in zip(sims, rows)])
    assert ev["accuracy_at_threshold"] == pytest.approx(expected_acc)
    assert ev["name"] == "pairs" and "auc" in ev
    assert result["threshold"] == 0.5 and result["threshold_source"] == "test"


def test_unlabelled_pairs_have_no_eval_and_a_missing_image_is_named(tmp_path):
    vectors = {"a": [1, 0], "b": [0, 1]}
    csv = _folder(tmp_path, vectors, [("a", "b", "No")])
    csv.write_text("file_x,file_y\nimg/a.png,img/b.png\n")
    result = verify_pair_list(VectorsByName(vectors), csv)
    assert result["eval"] is None and "label" not in result["pairs"][0]
    csv.write_text("file_x,file_y\nimg/a.png,img/missing.png\n")
    with pytest.raises(UserError, match="missing.png does not exist"):
        verify_pair_list(VectorsByName(vectors), csv)
