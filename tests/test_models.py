"""Model-level properties that the method tests do not cover."""

import copy

import torch

from mtlkit.models.hps import ChannelsLast, ConvEncoder


def test_channels_last_trunk_computes_the_same_function_as_nchw():
    torch.manual_seed(0)
    enc = ConvEncoder((1, 36, 36), channels=8, width=16).double()
    assert isinstance(enc[0], ChannelsLast)
    assert enc[1].weight.is_contiguous(memory_format=torch.channels_last)
    # The reference: the same weights in the default NCHW layout, with the layout change removed.
    ref = copy.deepcopy(enc).to(memory_format=torch.contiguous_format)
    ref[0] = torch.nn.Identity()
    assert ref[1].weight.is_contiguous()
    x = torch.randn(5, 1, 36, 36, dtype=torch.float64)
    out, out_ref = enc(x), ref(x)
    assert torch.allclose(out, out_ref, atol=1e-12)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for p, q in zip(enc.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-10)
