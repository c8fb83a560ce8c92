"""Repeated stateless operations on one tensor computed once (``lightning_app.dedup``): found by one forward,
bit-identical, never stale, and used by the engine on NASNet."""
import gc

import torch
import torch.nn as nn

from lightning_app.dedup import ResultTable, ReuseResult, deduplicate, find_repeats
from lightning_app.engine import relative_error
from test_engine import restructured_and_plain


class Branches(nn.Module):
    """Three branches rectify ``x`` (two with their own ReLU module), one rectifies ``y``; two equal pools of ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.inplace = nn.ReLU(inplace=True)
        self.p1, self.p2 = nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.p3 = nn.AvgPool2d(3, 1, 1)  # counts the padding: another operation
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.a(x) * 2 + self.b(x) + self.c(y) + self.p1(x) + self.p2(x) + self.p3(x) + self.inplace(y.clone())


def test_find_repeats_groups_equal_operations_on_the_same_tensor():
    groups = sorted(sorted(g) for g in find_repeats(Branches(), torch.randn(1, 4, 5, 5)))
    assert groups == [["a", "b"], ["p1", "p2"]]


class ModifiesInPlace(nn.Module):
    """Two equal ReLUs of ``x``, but one result is then changed in place: sharing it would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        y = x * 2
        first = self.a(x)
        first.add_(1.0)
        return first + self.b(x) + self.c(y) + self.d(y)


def test_find_repeats_leaves_out_results_changed_in_place():
    assert find_repeats(ModifiesInPlace(), torch.randn(2, 3)) == [["c", "d"]]


def test_deduplicated_network_is_bit_identical_and_computes_each_once():
    torch.manual_seed(0)
    net = Branches().eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = net(x)
    replaced = deduplicate(net, x[:1])
    assert sorted(n for n, _ in replaced) == ["a", "b", "p1", "p2"]
    calls = []
    for name in ("a", "b", "p1", "p2"):
        net.get_submodule(name).module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    with torch.no_grad():
        out = net(x)
    assert torch.equal(out, ref)
    assert sorted(calls) == ["a", "p1"]  # b and p2 reused a's and p1's results


def test_reuse_is_never_stale():
    table = ResultTable()
    relu = ReuseResult(nn.ReLU(), table).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        first = relu(x)
        assert relu(x) is first and table.hits == 1
        x.mul_(-1.0)  # the input changed in place: computed again
        second = relu(x)
        assert second is not first and torch.equal(second, x.relu())
        second.add_(1.0)  # a consumer changed the result in place: computed again
        assert torch.equal(relu(x), x.relu())
        assert relu(x.clone()) is not relu(x)  # another tensor with the same values is another input


def test_entries_go_with_their_input():
    table = ResultTable()
    relu = ReuseResult(nn.ReLU(), table).eval()
    with torch.no_grad():
        x = torch.randn(8)
        relu(x)
        assert len(table.entries) == 1
        del x
        gc.collect()
    assert not table.entries  # the result is not kept alive past its input


def test_no_reuse_where_gradients_are_wanted():
    table = ResultTable()
    a, b = ReuseResult(nn.ReLU(), table).eval(), ReuseResult(nn.ReLU(), table).eval()
    x = torch.randn(5, requires_grad=True)
    out = a(x) * 3 + b(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert table.hits == 0 and torch.equal(g, (x > 0).float() * 4)


def test_engine_deduplicates_nasnetmobile_bit_identically():
    net, x, engine, out, out_plain, ref = restructured_and_plain("NASNetMobile")
    wrapped = [m for m in engine._copy.net.modules() if isinstance(m, ReuseResult)]
    assert len(wrapped) > 50 and "modules restructured" in engine.status
    assert torch.equal(out, out_plain)  # the same operations, fewer of them
    assert relative_error(out, ref) <= 1e-4
    table = wrapped[0].table
    before = table.hits
    with torch.no_grad():
        engine(x)
    assert table.hits - before >= len(wrapped) // 2  # every forward reuses
