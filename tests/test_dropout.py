"""The heads' dropout: a mask of nn.Dropout's distribution from one uniform draw on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from lightning_app.dropout import Dropout, dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mask_has_dropouts_distribution(p):
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    y = Dropout(p).train()(x)
    values = torch.unique(y)
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / (1 - p)]))
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 4 * ((p * (1 - p)) / x.numel()) ** 0.5 + 1e-3
    assert abs(y.mean().item() - 1.0) < 0.02  # unbiased like nn.Dropout


def test_module_draws_dropout_mask_and_backpropagates_through_it():
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(3)
    y = Dropout(0.3).train()(x)
    torch.manual_seed(3)
    mask = dropout_mask(x, 0.3)
    torch.testing.assert_close(y, x * mask, rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, mask, rtol=0, atol=0)


def test_eval_identity_edge_cases_and_inplace():
    x = torch.randn(4, 5)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
    z = x.clone()
    torch.manual_seed(1)
    out = Dropout(0.5, inplace=True).train()(z)
    torch.manual_seed(1)
    assert out.data_ptr() == z.data_ptr() and torch.equal(out, x * dropout_mask(x, 0.5))


def test_cheaper_than_bernoulli_per_draw_on_cpu():
    """The reason it exists, as a count of work rather than a time: one uniform draw per element, no bernoulli
    kernel (torch.profiler sees ``aten::uniform_`` and no ``aten::bernoulli_``); F.dropout draws bernoulli."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(32, 256)
    with profile(activities=[ProfilerActivity.CPU]) as ours:
        Dropout(0.5).train()(x)
    with profile(activities=[ProfilerActivity.CPU]) as torchs:
        F.dropout(x, 0.5, True)
    names = {e.key for e in ours.key_averages()}
    assert "aten::uniform_" in names and "aten::bernoulli_" not in names
    assert "aten::bernoulli_" in {e.key for e in torchs.key_averages()}
