"""Per-example gradients and clipping against a loop over single examples (the oracle)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mechanisms.models import MaxPool2d, build_model
from mechanisms.per_example import (
    NORM_EPS,
    Workspace,
    clip_factors,
    clipped_grad_sum,
    ghost_per_example_grads,
    ghost_supported,
    per_example_grads,
    shared_parameters,
)


def _sum_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


def _loop_grads(model, x, y, loss_fn=_sum_ce):
    """Oracle: one backward pass per example."""
    out = []
    for i in range(len(y)):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return out


def _loop_clipped_sum(model, x, y, c, loss_fn=_sum_ce):
    grads = _loop_grads(model, x, y, loss_fn)
    norms = torch.stack([torch.cat([g.flatten() for g in d.values()]).norm() for d in grads])
    # the same factor min(1, C / (norm + NORM_EPS)) as the engines, computed one example at a time
    factors = [min(1.0, c / (float(norms[i]) + NORM_EPS)) for i in range(len(grads))]
    total = {n: sum(factors[i] * d[n] for i, d in enumerate(grads)) for n in grads[0]}
    return total, norms


def _assert_equals_loop(fast, slow):
    """Per-example gradients [B, ...] equal the loop's, parameter by parameter (none missing)."""
    assert set(fast) == set(slow[0])
    for n in fast:
        for i in range(len(slow)):
            torch.testing.assert_close(fast[n][i], slow[i][n], rtol=1e-10, atol=1e-12)


def _assert_ghost_equals_loop(model, x, y, workspace):
    """The ghost engine's per-example gradients, with ``workspace``, equal the loop's."""
    _assert_equals_loop(ghost_per_example_grads(model, x, y, workspace=workspace), _loop_grads(model, x, y))


def _assert_clipped_equal(got, want, norms):
    """A ClippedSum equals the loop's norms and clipped sums."""
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=1e-12)
    for n in want:
        torch.testing.assert_close(got.grads[n], want[n], rtol=1e-10, atol=1e-12)


class SeqModel(nn.Module):
    """Linear layers on a sequence axis, a dilated biased conv and a LayerNorm (vmap only)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2)
        self.lin = nn.Linear(3, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # [B, L, 3]
        return self.head(self.ln(torch.tanh(self.lin(h))).mean(1))


class ConvZoo(nn.Module):
    """Both ghost conv paths (single-channel patches, multi-channel grouped), with dilation,
    padding, bias and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, stride=1, padding=1, dilation=2)
        self.c2 = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        self.gn = nn.GroupNorm(2, 6)
        self.frozen = nn.Conv2d(6, 6, 1)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 5, bias=False)

    def forward(self, x):
        h = self.frozen(self.gn(torch.tanh(self.c2(torch.tanh(self.c1(x))))))
        return self.head(h.mean((2, 3)))


class SeqGhost(nn.Module):
    """Linear layers on 4-D and 3-D inputs (pixels x channels, then a sequence) and a
    GroupNorm on a sequence: every layer has a ghost rule, so the ghost engine takes it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, stride=2)
        self.pixel = nn.Linear(3, 4)
        self.token = nn.Linear(4, 4, bias=False)
        self.gn = nn.GroupNorm(2, 4, eps=0.5)  # not the default eps: the rule must use the layer's
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.tanh(self.pixel(torch.tanh(self.conv(x)).permute(0, 2, 3, 1)))  # [B, H, W, 4]
        h = torch.tanh(self.token(h.flatten(1, 2)))  # [B, L, 4]
        return self.head(self.gn(h.transpose(1, 2)).mean(2))


CASES = [
    ("mlp", (1, 8, 8)),
    ("cnn", (1, 28, 28)),
    ("resnet8", (3, 12, 12)),
    ("convzoo", (1, 11, 10)),
    ("seqghost", (2, 9, 8)),
]


def _model(name, shape):
    torch.manual_seed(0)
    if name in TEST_MODELS:
        model = TEST_MODELS[name]()
    else:
        model = build_model(name, shape, 5, seed=0)
    return model.double()


@pytest.mark.parametrize("name, shape", [*CASES, ("seq", (2, 9, 9))])
def test_vmap_per_example_grads_equal_loop(name, shape):
    model = _model(name, shape)
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
    fast = per_example_grads(model, x, y)
    slow = _loop_grads(model, x, y)
    _assert_equals_loop(fast, slow)


@pytest.mark.parametrize("engine", ["ghost", "vmap"])
@pytest.mark.parametrize("name, shape", CASES)
def test_clipped_sum_equals_loop(engine, name, shape):
    model = _model(name, shape)
    x, y = torch.randn(7, *shape, dtype=torch.float64) * 3, torch.randint(0, 5, (7,))
    c = 0.5
    workspace = Workspace()
    clipped_grad_sum(model, x[:3] * 2, y[:3], clip_norm=c, engine=engine, workspace=workspace)  # reuse
    got = clipped_grad_sum(model, x, y, clip_norm=c, engine=engine, workspace=workspace)
    want, norms = _loop_clipped_sum(model, x, y, c)
    want = {n: g for n, g in want.items() if dict(model.named_parameters())[n].requires_grad}
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=1e-12)
    assert set(got.grads) == set(want)
    for n in want:
        torch.testing.assert_close(got.grads[n], want[n], rtol=1e-10, atol=1e-12)
    assert (norms > c).any(), "test must exercise clipping"


def test_auto_falls_back_to_vmap_for_unsupported_layers():
    model = _model("seq", (2, 9, 9))
    assert not ghost_supported(model) and ghost_supported(build_model("resnet8", (3, 8, 8), 2))
    x, y = torch.randn(5, 2, 9, 9, dtype=torch.float64), torch.randint(0, 5, (5,))
    got = clipped_grad_sum(model, x, y, clip_norm=0.1)
    want, _ = _loop_clipped_sum(model, x, y, 0.1)
    for n in want:
        torch.testing.assert_close(got.grads[n], want[n], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="does not support"):
        clipped_grad_sum(model, x, y, clip_norm=0.1, engine="ghost")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=50), st.floats(1e-3, 1e3))
def test_clipped_norms_never_exceed_c(norms, c):
    n = torch.tensor(norms, dtype=torch.float64)
    f = clip_factors(n, c)
    assert bool(((f * n) <= c).all()) and bool((f <= 1).all()) and bool((f > 0).all())


def test_clipped_per_example_norms_bounded_on_real_gradients():
    model = _model("cnn", (1, 28, 28))
    x, y = torch.randn(16, 1, 28, 28, dtype=torch.float64) * 5, torch.randint(0, 5, (16,))
    grads = per_example_grads(model, x, y)
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    clipped = flat * clip_factors(flat.norm(dim=1), 0.01)[:, None]
    assert float(clipped.norm(dim=1).max()) <= 0.01


@pytest.mark.parametrize("shifted", [0, 32])
@pytest.mark.parametrize("limit, chunk_bytes", [(0, 2**21), (2**24, 2**21), (2**24, 1), (2**24, 180000)])
@pytest.mark.parametrize("name, shape", [c for c in CASES if c[0] in ("cnn", "resnet8")])
def test_every_conv_route_equals_the_loop(monkeypatch, shifted, limit, chunk_bytes, name, shape):
    """Patch GEMMs (whole lot, one example or a few at a time; shifted-window patches for
    narrow inputs or not) and the grouped-backward fallback (limit 0) agree with the loop."""
    import mechanisms.ghost_rules as gr
    import mechanisms.per_example as pe

    monkeypatch.setattr(gr, "PATCH_LIMIT", limit)
    monkeypatch.setattr(gr, "PATCH_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(gr, "SHIFTED_MAX_RUN", shifted)
    model = _model(name, shape)
    x, y = torch.randn(5, *shape, dtype=torch.float64) * 3, torch.randint(0, 5, (5,))
    fast = pe.ghost_per_example_grads(model, x, y)
    slow = _loop_grads(model, x, y)
    _assert_equals_loop(fast, slow)


class Shared(nn.Module):
    """One conv and one linear layer each applied twice (weight sharing), padded both times."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.lin = nn.Linear(2, 2)
        self.head = nn.Linear(2, 5)

    def forward(self, x):
        h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        return self.head(self.lin(torch.tanh(self.lin(h.mean((2, 3))))))


@pytest.mark.parametrize("engine", ["ghost", "vmap"])
def test_module_applied_twice_counts_both_uses(engine):
    torch.manual_seed(0)
    model = Shared().double()
    x, y = torch.randn(6, 2, 7, 7, dtype=torch.float64) * 3, torch.randint(0, 5, (6,))
    got = clipped_grad_sum(model, x, y, clip_norm=0.3, engine=engine, workspace=Workspace())
    want, norms = _loop_clipped_sum(model, x, y, 0.3)
    _assert_clipped_equal(got, want, norms)


class Thrice(nn.Module):
    """One padded conv applied three times: each application needs scratch buffers of its own."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.wide = nn.Conv2d(12, 12, 3, padding=1)  # 36 values per patch row: the patch route
        self.head = nn.Linear(14, 5)

    def forward(self, x):
        h = x
        for _ in range(3):
            h = torch.tanh(self.conv(h))
        w = torch.cat([h, x] * 3, dim=1)
        for _ in range(3):
            w = torch.tanh(self.wide(w))
        return self.head(torch.cat([h, w], dim=1).mean((2, 3)))


TEST_MODELS = {
    "seq": SeqModel,
    "convzoo": ConvZoo,
    "seqghost": SeqGhost,
    "thrice": Thrice,
    # a 3x3 input to a 3x3 conv of 16 channels: one output pixel on the patch route
    "onebyone": lambda: nn.Sequential(nn.Conv2d(16, 4, 3), nn.Tanh(), nn.Flatten(1), nn.Linear(4, 5)),
}


def test_a_module_applied_three_times_keeps_each_use_apart():
    """Both conv routes, three uses each: every use's per-example gradient equals the loop's
    (a shared scratch buffer between two uses would overwrite one with the other)."""
    model = _model("thrice", (2, 6, 6))
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64) * 2, torch.randint(0, 5, (5,))
    _assert_ghost_equals_loop(model, x, y, Workspace())
    got = clipped_grad_sum(model, x, y, clip_norm=0.3, engine="ghost", workspace=Workspace())
    want, norms = _loop_clipped_sum(model, x, y, 0.3)
    _assert_clipped_equal(got, want, norms)


@pytest.mark.parametrize("name, shape", [*CASES, ("thrice", (2, 6, 6)), ("onebyone", (16, 3, 3))])
def test_a_lot_of_one_example_and_a_one_pixel_output(name, shape):
    """Poisson lots of a single example are common at small sample rates; a 3x3 input to a
    3x3 conv of 16 channels leaves one output pixel (the patch route's smallest case)."""
    model = _model(name, shape)
    assert ghost_supported(model)
    for b in (1, 2):
        x, y = torch.randn(b, *shape, dtype=torch.float64) * 3, torch.randint(0, 5, (b,))
        _assert_ghost_equals_loop(model, x, y, Workspace())


def test_workspace_reuses_its_buffers_grows_with_headroom_and_follows_the_dtype():
    """Workspace.get: the same storage for a request that fits (25% headroom over the size
    that allocated it), a new one for a larger request or another dtype."""
    ws = Workspace()
    f32, f64 = torch.zeros(1), torch.zeros(1, dtype=torch.float64)
    first = ws.get((0, "a"), (10, 10), f32)
    assert first.shape == (10, 10) and first.dtype == torch.float32
    ptr = first.data_ptr()
    assert ws.get((0, "a"), (10, 10), f32).data_ptr() == ptr  # the same size: reused
    assert ws.get((0, "a"), (5, 25), f32).data_ptr() == ptr  # 125 elements fit the headroom
    assert ws.get((0, "a"), (3, 3), f32).data_ptr() == ptr  # smaller: reused
    assert ws.get((0, "b"), (10, 10), f32).data_ptr() != ptr  # another key: its own
    other = ws.get((0, "a"), (10, 10), f64)
    assert other.dtype == torch.float64 and other.data_ptr() != ptr  # another dtype: reallocated
    bigger = ws.get((0, "a"), (200,), f64)
    assert bigger.data_ptr() != other.data_ptr() and bigger.numel() == 200
    zeroed = ws.get((1, "z"), (4, 4), f32, zeroed=True)
    assert torch.equal(zeroed, torch.zeros(4, 4))


def test_a_workspace_shared_by_a_float32_and_a_float64_model():
    ws = Workspace()
    model = _model("convzoo", (1, 11, 10))
    for dtype in (torch.float32, torch.float64, torch.float32):
        model.to(dtype)  # the same modules (buffers are keyed by module), another dtype
        x, y = torch.randn(4, 1, 11, 10, dtype=dtype) * 3, torch.randint(0, 5, (4,))
        fast = ghost_per_example_grads(model, x, y, workspace=ws)
        slow = _loop_grads(model, x, y)
        for n in fast:
            assert fast[n].dtype == dtype
            for i in range(4):
                tol = 1e-10 if dtype == torch.float64 else 1e-4
                torch.testing.assert_close(fast[n][i], slow[i][n], rtol=tol, atol=tol)


class ChannelsLast(nn.Module):
    """Convolutions whose inputs and outputs are channels-last (padded and unpadded)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2)
        self.pool = MaxPool2d(2, 1)  # its backward hands c2 a channels-last gradient
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.head(self.pool(h).mean((2, 3)))


def test_channels_last_activations_equal_the_loop():
    """Channels-last layer inputs and output gradients take the conv rule's no-copy views."""
    torch.manual_seed(0)
    model = ChannelsLast().double()
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (5,))
    seen = []

    def spy(module, inputs, output):
        output.register_hook(seen.append)

    model.c2.register_forward_hook(spy)
    got = clipped_grad_sum(model, x * 3, y, clip_norm=0.2, engine="ghost", workspace=Workspace())
    cl = torch.channels_last
    assert seen[0].is_contiguous(memory_format=cl) and not seen[0].is_contiguous()
    want, norms = _loop_clipped_sum(model, x * 3, y, 0.2)
    _assert_clipped_equal(got, want, norms)


@pytest.mark.parametrize("name, shape", CASES)
def test_clipped_sums_are_fresh_tensors(name, shape):
    """A result survives later calls with the same workspace (callers add noise in place)."""
    model = _model(name, shape)
    ws = Workspace()
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
    first = clipped_grad_sum(model, x, y, clip_norm=0.5, engine="ghost", workspace=ws)
    kept = {n: g.clone() for n, g in first.grads.items()}
    clipped_grad_sum(model, -x, y, clip_norm=0.5, engine="ghost", workspace=ws)
    for n, g in first.grads.items():
        assert torch.equal(g, kept[n]), n


class Shifted(nn.Module):
    """Narrow convolutions for the shifted-window route: strides 1-3, kernels smaller than,
    equal to and not a multiple of the stride, rectangular kernels, uneven padding, and a
    channels-last output gradient (after the pooling)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(1, 3, 8, stride=2, padding=2),
                nn.Conv2d(3, 2, (4, 3), stride=(3, 2), padding=(2, 0)),
                nn.Conv2d(2, 4, 1, stride=2, bias=False),
                nn.Conv2d(4, 3, (2, 5), stride=(1, 3), padding=(0, 1)),
            ]
        )
        self.pool = MaxPool2d(2, 1)
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        a, b, c, d = self.convs
        h = torch.tanh(c(torch.tanh(b(torch.tanh(a(x))))))
        return self.head(torch.tanh(d(self.pool(h))).mean((2, 3)))


@pytest.mark.parametrize("chunk_bytes", [1, 9000, 2**21])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shifted_window_patches_equal_the_loop(monkeypatch, chunk_bytes, channels_last):
    import mechanisms.ghost_rules as gr
    import mechanisms.per_example as pe

    monkeypatch.setattr(gr, "PATCH_CHUNK_BYTES", chunk_bytes)
    calls = []
    original = gr.LayerRule._conv_shifted

    def spy(self, module, a, g):
        calls.append(gr._channels_last_only(g))
        return original(self, module, a, g)

    monkeypatch.setattr(gr.LayerRule, "_conv_shifted", spy)
    torch.manual_seed(0)
    model = Shifted().double()
    x = torch.randn(5, 1, 47, 40, dtype=torch.float64) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (5,))
    ws = Workspace()
    pe.ghost_per_example_grads(model, x[:2] * 2, y[:2], workspace=ws)  # reuse of the workspace
    fast = pe.ghost_per_example_grads(model, x, y, workspace=ws)
    slow = _loop_grads(model, x, y)
    assert len(calls) == 8 and any(calls) and not all(calls), calls  # both gradient layouts
    _assert_equals_loop(fast, slow)


@pytest.mark.parametrize("channels_last", [False, True])
def test_workspace_reuse_across_input_sizes(channels_last):
    """A workspace reused for inputs of another size (whose padded, stride-phase layout has
    the same shape) gives the loop's gradients: no stale pixels or output gradients remain in
    the zero borders."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 8, stride=2, padding=2), nn.Tanh(), nn.Flatten(1, -1), nn.LazyLinear(5)
    ).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ws = Workspace()
    for size in (28, 27, 28):  # 28 and 27 share the phase-plane shape (16 x 16)
        model[3] = nn.Linear(3 * ((size + 4 - 8) // 2 + 1) ** 2, 5).double()
        x = torch.randn(4, 1, size, size, dtype=torch.float64).contiguous(memory_format=fmt) * 3
        _assert_ghost_equals_loop(model, x, torch.randint(0, 5, (4,)), ws)


@pytest.mark.parametrize("channels_last", [False, True])
def test_workspace_reuse_when_only_the_output_width_changes(channels_last):
    """Widths 9 and 7 (kernel 2, stride 3) give the same output-gradient grid (3 phase
    columns) but 3 and 2 real output columns, and the extra column's patches read a real
    pixel: the grid buffer is keyed by the region written, or the previous lot's third column
    would stay in the zero border and enter this lot's gradients."""
    torch.manual_seed(0)
    # the 1x1 convolution after it keeps the first one's output gradient channels-last
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2, stride=3), nn.Tanh(), nn.Conv2d(2, 2, 1), nn.Flatten(1), nn.Identity()
    ).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    ws = Workspace()
    # then the height changes with the width kept: the grid's rows move in its flat buffer
    for height, width in ((6, 9), (6, 7), (6, 9), (6, 7), (9, 7), (6, 7)):
        out = ((height - 2) // 3 + 1) * ((width - 2) // 3 + 1)
        model[4] = nn.Linear(2 * out, 5).double()  # the head follows the size
        x = torch.randn(3, 1, height, width, dtype=torch.float64).contiguous(memory_format=fmt) * 3
        _assert_ghost_equals_loop(model, x, torch.randint(0, 5, (3,)), ws)


def test_workspace_reuse_when_only_the_height_changes_on_the_patch_route():
    """The patch route's zero-padded copy of the input, reused at another height: its border
    rows move in the flat buffer, so the buffer is keyed by its full shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(12, 2, 3, padding=1), nn.Tanh(), nn.Flatten(1), nn.Identity()).double()
    ws = Workspace()
    for height in (8, 6, 8, 6):
        model[3] = nn.Linear(2 * height * 5, 5).double()
        x = torch.randn(3, 12, height, 5, dtype=torch.float64) * 3
        _assert_ghost_equals_loop(model, x, torch.randint(0, 5, (3,)), ws)


def _tied_model():
    torch.manual_seed(0)
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight  # tied: one parameter, two modules
    return nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(6, 3)).double()


def test_tied_weights_go_to_an_engine_that_handles_them():
    """Issue 19: a weight shared by two modules got wrong per-example norms from the ghost
    engine, and its second use's gradient was filed under a key DP-SGD dropped."""
    from mechanisms.per_example import shared_parameters

    model = _tied_model()
    assert shared_parameters(model) == ["0.weight"] and not ghost_supported(model)
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    got = clipped_grad_sum(model, x, y, clip_norm=0.3)  # engine "auto"
    want, norms = _loop_clipped_sum(model, x, y, 0.3)
    assert set(got.grads) == set(want) == {n for n, _ in model.named_parameters()}
    for n in want:
        torch.testing.assert_close(got.grads[n], want[n], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.norms, norms, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="ghost"):
        clipped_grad_sum(model, x, y, clip_norm=0.3, engine="ghost")


@pytest.mark.parametrize("engine", ["ghost", "vmap"])
def test_a_custom_summed_loss_reaches_each_engine_and_its_loss_sum(engine):
    """``loss_fn`` (a summed loss other than cross-entropy) is the loss each engine
    differentiates and reports: the clipped sum equals a loop over single examples with that
    loss, and ``loss_sum`` is the batch's summed loss."""

    def squared(logits, y):  # cross-entropy plus a penalty on the logits, summed
        return F.cross_entropy(logits, y, reduction="sum") + 0.5 * logits.square().sum()

    model = build_model("mlp", (6,), 4, seed=3).double()
    x, y = torch.randn(5, 6, dtype=torch.float64) * 3, torch.randint(0, 4, (5,))
    got = clipped_grad_sum(model, x, y, clip_norm=0.05, engine=engine, loss_fn=squared)
    want, norms = _loop_clipped_sum(model, x, y, 0.05, squared)
    assert set(got.grads) == set(want) and (norms > 0.05).any()
    _assert_clipped_equal(got, want, norms)
    with torch.no_grad():
        assert got.loss_sum == pytest.approx(float(squared(model(x), y)), rel=1e-12)


def test_vmap_draws_dropout_per_example():
    """Dropout in training mode: each example gets its own mask under vmap (identical inputs
    give different gradients), as in a loop over examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    x, y = torch.randn(1, 8).repeat(6, 1), torch.zeros(6, dtype=torch.long)
    grads = per_example_grads(model, x, y)["0.weight"]
    assert not all(torch.equal(grads[0], grads[i]) for i in range(1, 6))


def test_auto_picks_ghost_where_it_is_supported_and_a_clip_norm_must_be_positive(monkeypatch):
    import mechanisms.per_example as pe

    used = []
    ghost, vmap_engine = pe._ghost_clipped_sum, pe._vmap_clipped_sum
    monkeypatch.setattr(pe, "_ghost_clipped_sum", lambda *a: used.append("ghost") or ghost(*a))
    monkeypatch.setattr(pe, "_vmap_clipped_sum", lambda *a: used.append("vmap") or vmap_engine(*a))
    model = build_model("mlp", (6,), 4, seed=3)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    clipped_grad_sum(model, x, y, clip_norm=1.0)
    clipped_grad_sum(model, x, y, clip_norm=1.0, engine="vmap")
    assert used == ["ghost", "vmap"]
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"clip_norm must be positive, got {bad}"):
            clipped_grad_sum(model, x, y, clip_norm=bad)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(2, 3, 3, padding="same"),
    ],
)
def test_ghost_declines_convolutions_it_has_no_rule_for(conv):
    assert not ghost_supported(nn.Sequential(conv, nn.Flatten()))
    assert ghost_supported(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten()))


def test_a_bare_layer_as_the_model_keeps_its_parameter_names():
    """The model itself a Linear: its parameters are 'weight' and 'bias' (no prefix), in the
    ghost engine's sums as in the model, and equal to the loop."""
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(6, 4, dtype=torch.float64) * 3, torch.randint(0, 3, (6,))
    got = clipped_grad_sum(model, x, y, clip_norm=0.5, engine="ghost")
    want, norms = _loop_clipped_sum(model, x, y, 0.5)
    assert set(got.grads) == {"weight", "bias"}
    _assert_clipped_equal(got, want, norms)


def test_shared_parameters_names_the_first_owner():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.weight = self.lin.weight  # the root owns the child's weight too

    assert shared_parameters(Root()) == ["weight"]
    with pytest.raises(ValueError, match="unknown per-example engine 'nope'; known: auto, ghost, vmap"):
        clipped_grad_sum(
            nn.Linear(3, 2), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), clip_norm=1.0, engine="nope"
        )


def test_a_module_registered_under_two_names_goes_to_vmap_and_equals_the_loop():
    """``self.b = self.a``: one module, two names, two uses. Its parameters count as shared
    (the ghost engine cannot take them), and auto's engine equals the loop."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))

    model = Twice().double()
    assert shared_parameters(model) == ["a.bias", "a.weight"] and not ghost_supported(model)
    x, y = torch.randn(6, 4, dtype=torch.float64) * 3, torch.randint(0, 3, (6,))
    want, norms = _loop_clipped_sum(model, x, y, 0.5)
    _assert_clipped_equal(clipped_grad_sum(model, x, y, clip_norm=0.5), want, norms)
