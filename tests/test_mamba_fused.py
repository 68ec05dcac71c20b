"""The fused CPU inference path of MambaMixer (conv+SiLU kernel, softplus/D/gate inside the scan kernel)
against the unfused forward with the sequential reference scan."""

import pytest
import torch
import torch.nn.functional as F

from medmoe.mamba import cpu_kernel
from medmoe.mamba.block import MambaMixer
from medmoe.mamba.config import MambaConfig
from medmoe.mamba.scan import selective_scan_reference

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="fused CPU kernel not built (no compiler)")
TOL = dict(rtol=1e-5, atol=1e-5)


def _mixer(seed=0, bias=True) -> MambaMixer:
    """Tiny mixer (d_model 16, d_inner 32, N 8, K 4, R 4); biases (in/out_proj ones with `bias`), D and A random."""
    torch.manual_seed(seed)
    m = MambaMixer(MambaConfig(vocab_size=32, d_model=16, n_layer=1, d_state=8, expand=2, d_conv=4, dt_rank=4,
                               bias=bias)).eval()
    with torch.no_grad():  # weights keep nn's default init (outputs of order 1, where 1e-5 means something)
        for name, p in m.named_parameters():
            if name.endswith("bias") or name == "D":
                p.copy_(torch.randn_like(p) * 0.5)
        m.A_log.copy_(torch.rand_like(m.A_log) * 2 - 1)
    return m


def _reference(m: MambaMixer):
    """Context: the same module on the unfused path with the sequential (definition) scan."""
    class _Ctx:
        def __enter__(self):
            m.fused, m.scan_backend = False, "reference"

        def __exit__(self, *exc):
            m.fused, m.scan_backend = True, "auto"
    return _Ctx()


def _spy(m: MambaMixer, monkeypatch) -> list:
    calls = []
    original = m._forward_fused
    monkeypatch.setattr(m, "_forward_fused", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("length", [1, 3, 17, 64])
def test_fused_forward_matches_reference(length, monkeypatch):
    m = _mixer()
    calls = _spy(m, monkeypatch)
    hidden = torch.randn(2, length, 16)
    with torch.no_grad():
        out = m(hidden)
        with _reference(m):
            ref = m(hidden)
    assert calls, "the fused path was not taken"
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("first,second", [(1, 2), (3, 17), (17, 64), (64, 1)])
def test_fused_state_continuation_matches_reference(first, second):
    """Prefill `first` tokens into a state, continue with `second`: outputs and states as the reference."""
    m = _mixer(1)
    hidden = torch.randn(2, first + second, 16)
    with torch.no_grad():
        results = []
        for fused in (True, False):
            m.fused, m.scan_backend = fused, "auto" if fused else "reference"
            state = m.new_state(2)
            outs = [m(hidden[:, :first], state), m(hidden[:, first:], state)]
            results.append((torch.cat(outs, 1), state.conv, state.ssm))
        m.fused, m.scan_backend = True, "auto"
        whole = m(hidden)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(results[0][0], whole, **TOL)  # continuing equals one pass over everything


def test_fused_mask_matches_reference_and_zero_state():
    """Left padding: masked positions are zeroed before in_proj and after the conv, as the unfused path does."""
    m = _mixer(2, bias=False)  # no in_proj bias (as Mamba checkpoints): padded positions then feed the conv zeros
    hidden = torch.randn(2, 17, 16)
    mask = torch.ones(2, 17)
    mask[1, :5] = 0
    with torch.no_grad():
        state = m.new_state(2)
        out = m(hidden, state, mask)
        with _reference(m):
            ref_state = m.new_state(2)
            ref = m(hidden, ref_state, mask)
        alone = m(hidden[1:, 5:])                                 # the padded row's real tokens, no padding
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(state.ssm, ref_state.ssm, **TOL)
    torch.testing.assert_close(out[1:, 5:], alone, **TOL)


def test_unfused_when_grad_needed_or_switched_off(monkeypatch):
    m = _mixer()
    calls = _spy(m, monkeypatch)
    out = m(torch.randn(1, 5, 16))                              # grad enabled, parameters require grad
    assert out.requires_grad and not calls
    monkeypatch.setenv("MEDMOE_MAMBA_FUSED", "0")
    with torch.no_grad():
        m(torch.randn(1, 5, 16))
    assert not calls


@pytest.mark.parametrize("silu", [True, False])
def test_causal_conv_kernel_matches_conv1d(silu):
    """Strided x (a slice of a wider tensor), a conv state prefix, and a mask."""
    torch.manual_seed(3)
    b, l, d, K = 2, 9, 40, 4
    wide = torch.randn(b, l, 2 * d)
    x, weight, bias, state = wide[..., :d], torch.randn(d, 1, K), torch.randn(d), torch.randn(b, K - 1, d)
    mask = (torch.rand(b, l) > 0.3).float()
    want = F.conv1d(torch.cat([state, x], 1).transpose(1, 2), weight, bias, groups=d).transpose(1, 2)
    want = (F.silu(want) if silu else want) * mask[..., None]
    got = cpu_kernel.causal_conv(x, weight, bias, state, mask, silu=silu)
    torch.testing.assert_close(got, want, **TOL)
    no_state = F.conv1d(x.transpose(1, 2), weight, bias, padding=K - 1, groups=d)[..., :l].transpose(1, 2)
    torch.testing.assert_close(cpu_kernel.causal_conv(x, weight, bias, silu=False), no_state, **TOL)


@pytest.mark.parametrize("g", [1, 3])
def test_scan_gated_kernel_matches_reference(g):
    """softplus(dt + bias), groups, strided B/C/z views, an initial state, channels not a multiple of 16."""
    torch.manual_seed(4)
    b, l, d, n = 2, 23, 42, 8
    u, dt, bias = torch.randn(b, l, d), torch.randn(b, l, d) - 1, torch.randn(d) * 0.3
    A, D, h0 = -torch.rand(d, n) - 0.05, torch.randn(d), torch.randn(b, d, n)
    BC = torch.randn(b, l, g, 2 * n + 3)
    B, C = BC[..., :n], BC[..., n + 3:]
    z = torch.randn(b, l, 2 * d)[..., d:]
    y_ref, h_ref = selective_scan_reference(u, F.softplus(dt + bias), A, B, C, D, h0.clone())
    y, h = cpu_kernel.scan_gated(u, dt, bias, A, B, C, D, z, h0)
    torch.testing.assert_close(y, y_ref * F.silu(z), **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)


def test_attention_mamba_fused_matches_reference(monkeypatch):
    """The transferred mixer (GQA: 4 query heads, 2 kv heads) on the fused path, with left padding read
    from a 4D mask and a recurrent state continued through a cache, against its unfused path."""
    from medmoe.mamba.attention_mixer import AttentionMamba
    from medmoe.mamba.hybrid_cache import HybridCache

    torch.manual_seed(5)
    m = AttentionMamba(hidden=32, heads=4, kv_heads=2, head_dim=8).eval()
    with torch.no_grad():  # move off the identity / zero / constant initialisation so every part matters
        m.conv1d.weight.copy_(torch.randn_like(m.conv1d.weight) * 0.5)
        m.conv1d.bias.copy_(torch.randn_like(m.conv1d.bias) * 0.5)
        m.D.copy_(torch.randn_like(m.D))
        m.A_log.copy_(torch.rand_like(m.A_log) * 2 - 1)
        m.dt_proj.weight.copy_(torch.randn_like(m.dt_proj.weight) * 0.3)
    hidden = torch.randn(2, 12, 32)
    keep = torch.ones(2, 12, dtype=torch.bool)
    keep[1, :4] = False
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    mask4 = causal & keep[:, None, None, :] & keep[:, None, :, None]            # (b, 1, l, l), True = attend
    calls, conv = [], cpu_kernel.causal_conv
    monkeypatch.setattr(cpu_kernel, "causal_conv", lambda *a, **k: calls.append(1) or conv(*a, **k))
    results = []
    with torch.no_grad():
        for fused in (True, False):
            m.fused, m.scan_backend = fused, "auto" if fused else "reference"
            cache = HybridCache()
            first = m(hidden[:, :7], mask4[..., :7, :7], cache=cache)[0]
            second = m(hidden[:, 7:], None, cache=cache)[0]
            state = cache.recurrent[0]
            results.append((torch.cat([first, second], 1), state.conv, state.ssm))
    assert len(calls) == 2, "the fused path was not taken (or taken when switched off)"
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL)


def test_scan_kernel_exp_over_its_range():
    """The kernel's inlined exp (cpu_kernel.py, fast_exp) against torch.exp: one step from h0 = 1 with
    u = 0 leaves h = exp(delta A). delta A spans [-120, 3]: underflow (clamped at -87), the decays a
    trained model sees, and positive exponents (a `scan` caller may pass delta < 0)."""
    exponents = torch.cat([torch.linspace(-120, -80, 41), torch.linspace(-80, 3, 830)])  # (d,), d = 871
    d = exponents.numel()
    delta, A = -exponents.view(1, 1, d), -torch.ones(d, 1)  # delta A = exponents
    u, ones = torch.zeros(1, 1, d), torch.ones(1, 1, 1, 1)
    y, h = cpu_kernel.scan(u, delta, A, ones, ones, h0=torch.ones(1, d, 1))
    want = torch.exp(exponents)
    torch.testing.assert_close(h[0, :, 0], want, rtol=2e-6, atol=1e-37)
    torch.testing.assert_close(y[0, 0], want, rtol=2e-6, atol=1e-37)
