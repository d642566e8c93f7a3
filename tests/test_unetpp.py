"""The paper's UNet++: wiring, deep supervision, loss, and a learning check on a toy task."""

import pytest
import torch

from helpers.core.errors import InputError
from helpers.learning.unetpp import as_head_list, build_segmenter, deep_supervision_dice_loss, probabilities


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_segmenter("paper")


@pytest.mark.slow
def test_four_heads_at_full_resolution(net):
    net.eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 3, 224, 224))
    assert len(out) == 4 and all(o.shape == (2, 1, 224, 224) for o in out)
    p = probabilities(out)
    assert p.shape == (2, 1, 224, 224) and float(p.min()) >= 0 and float(p.max()) <= 1


def test_node_shapes_follow_the_nested_grid(net):
    s = net.node_shapes(224)
    # encoder column: 1/2 ... 1/32 of 224
    assert [s[f"X[{i}][0]"][1] for i in range(5)] == [112, 56, 28, 14, 7]
    # 10 decoder nodes (i + j <= 4, j >= 1), each at its row's resolution
    dec = [k for k in s if not k.endswith("[0]")]
    assert len(dec) == 10
    assert s["X[0][4]"][1:] == (112, 112) and s["X[3][1]"][1:] == (14, 14)


def test_dense_skips_feed_every_earlier_node(net):
    # X[0][3] concatenates X[0][0], X[0][1], X[0][2] and up(X[1][2]).
    conv = net.node["0_3"][0]
    s = net.node_shapes(224)
    want = s["X[0][0]"][0] + s["X[0][1]"][0] + s["X[0][2]"][0] + s["X[0][1]"][0]
    assert conv.in_channels == want
    assert isinstance(net.up["0_3"], torch.nn.ConvTranspose2d)  # the paper's upsampling


def test_input_size_must_suit_the_encoder(net):
    with pytest.raises(InputError, match="multiples of 32"):
        net(torch.zeros(1, 3, 100, 100))


@pytest.mark.slow
def test_deep_supervision_loss_reaches_every_head(net):
    net.train()
    x = torch.rand(2, 3, 64, 64)
    t = (torch.rand(2, 64, 64) > 0.5).float()
    loss = deep_supervision_dice_loss(net(x), t)
    loss.backward()
    for head in net.heads:
        assert head[-1].weight.grad is not None and float(head[-1].weight.grad.abs().sum()) > 0
    net.zero_grad()


def test_smp_variant_gives_one_head():
    m = build_segmenter("smp").eval()
    with torch.no_grad():
        out = as_head_list(m(torch.zeros(1, 3, 64, 64)))
    assert len(out) == 1 and out[0].shape == (1, 1, 64, 64)
    with pytest.raises(InputError, match="variant"):
        build_segmenter("unet")


@pytest.mark.slow
def test_learns_a_toy_mask():
    torch.manual_seed(1)
    net = build_segmenter("paper")
    x = torch.rand(4, 3, 64, 64) * 0.3
    t = torch.zeros(4, 64, 64)
    t[:, 16:48, 16:48] = 1
    x[:, 0] += t * 0.7  # the "tumour" is red
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(40):
        loss = deep_supervision_dice_loss(net(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = probabilities(net(x))[:, 0] > 0.5
    inter = (pred & t.bool()).sum().item()
    dice = 2 * inter / (pred.sum().item() + t.sum().item())
    assert dice > 0.8
