"""The student's EMA: its update rule, and the EMA weights swapped into the module and back."""

import pytest
import torch

from workers.train.ema import EMA


def test_ema_follows_the_parameters_and_swaps_in_and_out():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[0].bias.requires_grad_(False)  # frozen parameters have no shadow
    ema = EMA(net, decay=0.75)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    assert "0.bias" not in ema.shadow

    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for name in ema.shadow:  # 0.75·old + 0.25·new = old + 0.25
        torch.testing.assert_close(ema.shadow[name], start[name] + 0.25)

    own = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(5, 3)
    with ema.swapped_in(net):
        torch.testing.assert_close(net[1].weight, ema.shadow["1.weight"])
        torch.testing.assert_close(net[0].bias, own["0.bias"])
        swapped_out = net(x)
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, own[key], rtol=0, atol=0)
    assert not torch.allclose(swapped_out, net(x))

    with pytest.raises(RuntimeError), ema.swapped_in(net):  # restored even when the block fails
        raise RuntimeError("sampling failed")
    torch.testing.assert_close(net[1].weight, own["1.weight"], rtol=0, atol=0)

    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)
