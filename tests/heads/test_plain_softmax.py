"""plain_softmax: the un-normalised baseline (logits = x . W^T + b, cross-entropy), as Face_Pytorch
compares against; a name of its own in MARGINS, the full classifier only."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginface.errors import UserError
from marginface.heads import MARGINS, Classifier, build_loss_head
from marginface.heads.partial_fc import PartialFC
from marginface.train.runconfig import load_config


def test_logits_are_x_w_plus_b_and_the_loss_is_cross_entropy():
    torch.manual_seed(0)
    head = build_loss_head("plain_softmax", 6, 4)
    assert isinstance(head, Classifier) and "plain_softmax" in MARGINS
    assert set(dict(head.named_parameters())) == {"weight", "bias"}
    with torch.no_grad():
        head.weight.normal_()
        head.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    x = torch.randn(5, 6) * 7.0  # norms far from 1: nothing is normalised
    y = torch.tensor([0, 1, 2, 3, 1])
    out = head(x, y)
    ref = x.double().numpy() @ head.weight.detach().double().numpy().T + head.bias.detach().double().numpy()
    np.testing.assert_allclose(out.logits.detach().double().numpy(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss, F.cross_entropy(torch.tensor(ref, dtype=torch.float32), y),
                               rtol=1e-5, atol=1e-5)
    assert out.stats["accuracy"] == pytest.approx(float((torch.tensor(ref).argmax(1) == y).float().mean()))
    out.loss.backward()
    assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0


def test_bias_false_is_face_pytorchs_inner_product():
    head = build_loss_head("plain_softmax", 3, 2, {"bias": False})
    assert head.bias is None and set(dict(head.named_parameters())) == {"weight"}
    x = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(head(x, torch.tensor([1])).logits, x @ head.weight.detach().t())


def test_differs_from_the_normalised_softmax():
    torch.manual_seed(0)
    plain, norm = build_loss_head("plain_softmax", 4, 3), build_loss_head("softmax", 4, 3)
    with torch.no_grad():
        norm.weight.copy_(plain.weight)
    x = torch.randn(2, 4) * 5
    assert not torch.allclose(plain(x, torch.tensor([0, 1])).logits, norm(x, torch.tensor([0, 1])).logits)


def test_partial_fc_and_sampling_refuse_it_in_one_line():
    with pytest.raises(UserError) as info:
        load_config(None, ["head.loss=plain_softmax", "head.sample_rate=0.5"])
    assert "plain_softmax" in str(info.value) and "full classifier" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="un-normalised"):
        PartialFC(4, 4, MARGINS["plain_softmax"]())
    with pytest.raises(UserError, match="bias must be true or false"):
        load_config(None, ["head.loss=plain_softmax", "head.params={bias: 1}"])
