"""The fast selective-scan backends against the sequential definition (scan.selective_scan_reference)."""

import pytest
import torch
import torch.nn.functional as F

from medmoe.mamba import cpu_kernel
from medmoe.mamba.scan import selective_scan, selective_scan_reference, selective_state_step


def _inputs(b=2, l=70, d=24, n=8, g=1, decay=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(b, l, d, generator=gen)
    delta = F.softplus(torch.randn(b, l, d, generator=gen) - 1)
    A = -torch.rand(d, n, generator=gen) * decay - 0.05
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    D, h0 = torch.randn(d, generator=gen), torch.randn(b, d, n, generator=gen)
    return u, delta, A, B, C, D, h0


BACKENDS = ["chunked"] + (["cpu"] if cpu_kernel.available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("g", [1, 3])
@pytest.mark.parametrize("decay", [1.0, 60.0])  # 60: chunks whose total decay overflow the cumsum form
def test_backend_matches_reference(backend, g, decay):
    u, delta, A, B, C, D, h0 = _inputs(g=g, decay=decay)
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, D, h0.clone())
    y, h = selective_scan(u, delta, A, B, C, D, h0.clone(), backend=backend)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)


def test_chunk_size_does_not_change_result():
    u, delta, A, B, C, D, h0 = _inputs(l=100)
    y16, _ = selective_scan(u, delta, A, B, C, D, h0, backend="chunked", chunk=16)
    y64, _ = selective_scan(u, delta, A, B, C, D, h0, backend="chunked", chunk=64)
    torch.testing.assert_close(y16, y64, rtol=1e-4, atol=1e-4)


def test_step_matches_reference():
    u, delta, A, B, C, D, h0 = _inputs(g=3, l=20)
    y_ref, h_ref = selective_scan_reference(u, delta, A, B, C, D, h0.clone())
    h = h0.clone()
    ys = [selective_state_step(h, u[:, t], delta[:, t], A, B[:, t], C[:, t], D) for t in range(u.shape[1])]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay", [1.0, 60.0])  # closed form and doubling paths
def test_chunked_gradients_match_reference(decay):
    tensors = [t.double().requires_grad_() for t in _inputs(l=40, d=6, n=4, g=2, decay=decay)]
    y, h = selective_scan(*tensors, backend="chunked", chunk=16)
    grads = torch.autograd.grad((y.sin().sum() + h.sum()), tensors)
    ref_tensors = [t.detach().clone().requires_grad_() for t in tensors]
    y_r, h_r = selective_scan_reference(*ref_tensors)
    ref_grads = torch.autograd.grad((y_r.sin().sum() + h_r.sum()), ref_tensors)
    for g_, r in zip(grads, ref_grads):
        torch.testing.assert_close(g_, r, rtol=1e-7, atol=1e-7)


def test_auto_uses_differentiable_path_when_grad_needed():
    u, delta, A, B, C, D, h0 = _inputs()
    u.requires_grad_()
    y, _ = selective_scan(u, delta, A, B, C, D, h0, backend="auto")
    assert y.requires_grad


def test_bad_shapes_raise_clear_error():
    u, delta, A, B, C, D, h0 = _inputs()
    with pytest.raises(ValueError, match="B and C"):
        selective_scan(u, delta, A, B[..., :3], C, D, h0)
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(u, delta, A, B, C, D, h0, backend="fast")
