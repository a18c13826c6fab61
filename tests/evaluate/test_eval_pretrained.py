"""A real pretrained embedder through our evaluation: the 190 labelled LFW cross pairs of lfw_head20.

The 20 images of lfw_head20.bin show 6 people (names from the official pairs file), so every
image pair i < j is labelled: 190 pairs, 30 of them same-person. A correct pipeline (colour
order, ImageNet normalisation for this model, flip-sum) separates them (AUC >= 0.99).
"""

import numpy as np
import pytest

from marginface.data.verification import load_bin
from marginface.evaluate.metrics import verification_metrics
from marginface.evaluate.runner import embed_images, l2_normalize
from shared_data import shared_data  # noqa: E402  (tests/shared_data.py)

SHARED = shared_data()  # tests/shared_data.py: $MARGINFACE_SHARED_DATA or ../shared/data


def test_pretrained_onnx_separates_the_lfw_cross_pairs():
    onnx_path = SHARED / "weights" / "mobilefacenet_onnx" / "MobileFaceNet.onnx"
    bin_path = SHARED / "verification" / "lfw_head20.bin"
    if not (onnx_path.is_file() and bin_path.is_file()):
        pytest.skip(f"shared data absent: {onnx_path} / {bin_path}")
    pytest.importorskip("onnxruntime")
    from marginface.deploy.load import load_model

    ps = load_bin(bin_path)
    first_fold = (SHARED / "verification" / "lfw_pairs.txt").read_text().splitlines()[1:11]
    people = np.repeat([line.split()[0] for line in first_fold], 2)  # images 2k, 2k+1 show person k
    model = load_model(str(onnx_path), normalize="imagenet")
    emb = l2_normalize(embed_images(model, ps.images, flip=True, normalize="imagenet"))[ps.pairs.reshape(-1)]
    i, j = np.triu_indices(20, 1)
    same = people[i] == people[j]
    m = verification_metrics((emb[i] * emb[j]).sum(1), same)
    assert (m["pairs"], int(same.sum())) == (190, 30)
    assert m["auc"] >= 0.99, m
    assert m["pos_mean"] > m["neg_mean"] + 0.5
