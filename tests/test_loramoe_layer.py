"""LoraMoeLinear against its equation, computed token by token; config serialisation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medmoe.errors import ModelError
from medmoe.loramoe import LoraMoeConfig, LoraMoeLinear, sparse_kernel
from medmoe.loramoe.layer import expert_mix_gather
from medmoe.loramoe.router import top_k_gates


def _layer(compute="dense", d_in=12, d_out=10, **kw):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    cfg = LoraMoeConfig(num_experts=4, top_k=2, rank=3, alpha=6.0, router_dim=5, compute=compute, **kw)
    layer = LoraMoeLinear(base, cfg)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _equation_reference(layer: LoraMoeLinear, x: torch.Tensor) -> torch.Tensor:
    """y_t = W_0 x_t + b + (alpha/r) sum_{i in TopK} ghat_i B_i A_i x_t, one token at a time."""
    w_q, keys, t = layer.router.w_q, layer.router.keys, layer.config.temperature
    rows = []
    for x_t in x:
        q = w_q @ x_t
        q = q / q.norm()
        c = keys / keys.norm(dim=-1, keepdim=True)
        g = torch.softmax(c @ q / t, dim=0)
        top = torch.argsort(g, descending=True)[: layer.config.top_k]
        y = layer.base_layer.weight @ x_t + layer.base_layer.bias
        for i in top:
            y = y + layer.config.scaling * (g[i] / g[top].sum()) * (layer.lora_B[i] @ (layer.lora_A[i] @ x_t))
        rows.append(y)
    return torch.stack(rows)


needs_sparse_kernel = pytest.mark.skipif(not sparse_kernel.available(), reason="no C++ compiler: the sparse kernel is not built")
SPARSE = pytest.param("sparse", marks=needs_sparse_kernel)


@pytest.mark.parametrize("compute", ["auto", SPARSE, "dense", "gather", "loop"])
def test_layer_matches_equation(compute):
    layer = _layer(compute)
    x = torch.randn(7, 12)
    assert torch.allclose(layer(x), _equation_reference(layer, x), atol=1e-5)


def test_batched_shapes_and_gradients_agree_across_compute_kinds():
    x = torch.randn(2, 5, 12)
    grads, outs = {}, {}
    kinds = ("dense", "gather", "loop") + (("sparse",) if sparse_kernel.available() else ())
    for compute in kinds:
        layer = _layer(compute)
        y = layer(x)
        assert y.shape == (2, 5, 10)
        (y.square().sum()).backward()
        outs[compute] = y.detach()
        grads[compute] = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), layer.router.w_q.grad.clone())
    for compute in kinds[1:]:
        assert torch.allclose(outs[compute], outs["dense"], atol=1e-5)
        for g, g_ref in zip(grads[compute], grads["dense"]):
            assert (g - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()  # fp32: the kinds sum in different orders


def test_fresh_layer_is_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoraMoeLinear(base, LoraMoeConfig(router_dim=5))
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.lora_A.shape == (8, 8, 12) and layer.lora_B.shape == (8, 10, 8)
    x = torch.randn(3, 4, 12)
    assert torch.equal(layer(x), base(x))


def test_top_k_gates_renormalise():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 0.0]])
    gates, top_i = top_k_gates(logits, 2)
    assert top_i[0].tolist() == [3, 2]
    probs = logits.softmax(-1)  # the definition: renormalise the top-k of softmax(logits)
    top_p = probs.gather(1, top_i)
    assert torch.allclose(gates, top_p / top_p.sum(-1, keepdim=True))
    e = torch.exp(torch.tensor([3.0, 2.0]))
    assert torch.allclose(gates[0], e / e.sum())
    assert torch.allclose(gates.sum(-1), torch.ones(2))


def test_router_runs_in_fp32_for_a_bf16_base():
    base = nn.Linear(12, 10).to(torch.bfloat16)
    layer = LoraMoeLinear(base, LoraMoeConfig(router_dim=5))
    assert layer.router.w_q.dtype == torch.float32 and layer.lora_A.dtype == torch.bfloat16
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    logits, q = layer.router(x.reshape(-1, 12))
    assert logits.dtype == torch.float32 and q.dtype == torch.float32
    assert layer(x).dtype == torch.bfloat16


def test_linear_router_kind():
    layer = _layer("dense", router_kind="linear", contrastive_kind="none")
    x = torch.randn(6, 12)
    logits, q = layer.router(x)
    assert q is None and torch.allclose(logits, x @ layer.router.w_g.t())


def test_config_json_round_trip(tmp_path):
    cfg = LoraMoeConfig(num_experts=6, top_k=1, target_modules=["q_proj", "v_proj"], contrastive_tokens=None, queue_size=0)
    path = cfg.save(tmp_path)
    assert json.loads(path.read_text())["num_experts"] == 6
    assert LoraMoeConfig.load(tmp_path) == cfg
    assert LoraMoeConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 9}, "top_k"),
        ({"router_kind": "hash"}, "router_kind"),
        ({"router_kind": "linear"}, "needs router_kind 'prototype'"),
        ({"temperature": 0.0}, "temperature"),
        ({"target_modules": "all"}, "target_modules"),
    ],
)
def test_invalid_config_names_the_problem(kwargs, message):
    with pytest.raises(ModelError, match=message):
        LoraMoeConfig(**kwargs)


def test_unknown_config_key(tmp_path):
    (tmp_path / "loramoe_config.json").write_text(json.dumps({"experts": 4}))
    with pytest.raises(ModelError, match="unknown LoRA-MoE config keys"):
        LoraMoeConfig.load(tmp_path)


@pytest.mark.parametrize("compute", [SPARSE, "dense"])
def test_active_dropout_matches_the_loop_reference(compute):
    """With dropout on, the experts read dropout(x) and the router x: the unfused path (dense, or the
    sparse kernel adding into the base layer's output in place)."""
    x = torch.randn(2, 5, 12)
    outs, grads, layers = {}, {}, {}
    for kind in (compute, "loop"):
        layer = layers[kind] = _layer(kind, dropout=0.5)
        layer.train()
        torch.manual_seed(3)  # the same dropout mask for both
        y = layer(x)
        y.square().sum().backward()
        outs[kind] = y.detach()
        grads[kind] = (layer.lora_A.grad, layer.lora_B.grad, layer.router.w_q.grad)
    assert torch.allclose(outs[compute], outs["loop"], atol=1e-5)
    for g, g_ref in zip(grads[compute], grads["loop"]):
        assert torch.allclose(g, g_ref, atol=1e-4)
    layer = layers[compute].eval()  # no dropout at inference: the fused path, and the equation again
    assert torch.allclose(layer(x[0]), _equation_reference(layer, x[0]), atol=1e-5)


# --- the fused dense path (fused.py): hand-written backward pinned against autograd and the loop ---


def test_fused_functions_pass_gradcheck():
    """FusedProjection and ExpertMix backward against finite differences, fp64, bias and all inputs."""
    from medmoe.loramoe.fused import ExpertMix, FusedProjection

    torch.manual_seed(0)
    n, d_in, d_out, e, r, d_q = 5, 6, 4, 3, 2, 3
    f64 = {"dtype": torch.float64, "requires_grad": True}
    x, w0, bias = torch.randn(n, d_in, **f64), torch.randn(d_out, d_in, **f64), torch.randn(d_out, **f64)
    w_lora = torch.randn(e * r + d_q, d_in, **f64)
    assert torch.autograd.gradcheck(lambda *a: FusedProjection.apply(*a, d_q), (x, w0, bias, w_lora))
    y0, h = torch.randn(n, d_out, **f64), torch.randn(n, e * r, **f64)
    gates, b_t = torch.rand(n, e, **f64), torch.randn(e * r, d_out, **f64)
    assert torch.autograd.gradcheck(ExpertMix.apply, (y0, h, gates, b_t))


@pytest.mark.parametrize("compute, dtype, tol", [("dense", torch.float32, 1e-5), ("dense", torch.float64, 1e-12),
                                                 pytest.param("sparse", torch.float32, 1e-5, marks=needs_sparse_kernel)])
@pytest.mark.parametrize("router_kind", ["prototype", "linear"])
def test_fused_layer_matches_the_loop_reference(compute, dtype, tol, router_kind):
    """Output and every gradient (x, A, B, router) of the fused paths equal the per-expert loop's."""
    contrastive = "prototype" if router_kind == "prototype" else "none"
    x = torch.randn(3, 7, 12, dtype=dtype)
    results = {}
    for kind in (compute, "loop"):
        layer = _layer(kind, router_kind=router_kind, contrastive_kind=contrastive).to(dtype)
        assert layer._mix_kind(x.reshape(-1, 12)) == kind
        x_in = x.clone().requires_grad_(True)
        y = layer(x_in)
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=dtype)).square().sum().backward()
        results[kind] = [y.detach(), x_in.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    for got, ref in zip(results[compute], results["loop"]):
        assert got is not None and ref is not None
        assert (got - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("compute", [SPARSE, "dense"])
def test_fused_layer_auxiliary_losses_match_the_loop_reference(compute):
    """Balance, z and contrastive losses (router inputs collected by the layer) and their gradients."""
    x = torch.randn(2, 9, 12)
    results = {}
    for kind in (compute, "loop"):
        layer = _layer(kind, contrastive_tokens=None, queue_size=0)
        layer.context.compute_aux = layer.context.track_load = True
        layer(x)
        losses = layer.aux_losses
        assert set(losses) == {"balance", "z", "contrastive"}
        sum(losses.values()).backward()
        results[kind] = [losses[k].detach() for k in sorted(losses)] + [layer.router.w_q.grad, layer.router.keys.grad, layer.expert_load.clone()]
    for got, ref in zip(*results.values()):
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()  # fp32 rounding: the sparse kernel sums in another order


def test_fused_path_is_skipped_for_hooked_or_subclassed_bases():
    x = torch.randn(4, 12)
    layer = _layer("dense")
    assert layer._fusable(x)
    handle = layer.base_layer.register_forward_hook(lambda module, inputs, out: out * 2)
    assert not layer._fusable(x)
    assert torch.allclose(layer(x), _equation_reference(layer, x) + layer.base_layer(x) / 2, atol=1e-5)
    handle.remove()
    layer.train()
    layer.dropout = nn.Dropout(0.5)
    assert not layer._fusable(x)


@pytest.mark.parametrize("compute", [SPARSE, "dense"])
def test_inference_path_matches_training_path_and_follows_weight_updates(compute):
    """Without gradients the layer keeps its stacked weights between calls (`_forward_inference`); it
    must equal the autograd path, and see in-place updates of A, B and the router (optimizer steps)."""
    layer = _layer(compute)
    x = torch.randn(7, 12)
    with torch.no_grad():
        fast = layer(x)
        assert torch.equal(layer(x), fast)  # cached weights, same result
    assert torch.allclose(fast, layer(x), atol=1e-6)  # grad enabled: the autograd (fused) path
    assert torch.allclose(fast, _equation_reference(layer, x), atol=1e-5)
    torch.manual_seed(1)
    for param in (layer.lora_A, layer.lora_B, layer.router.w_q):
        with torch.no_grad():
            param.add_(torch.randn_like(param))  # in place, as an optimizer step or load_state_dict does
            updated = layer(x)
        assert (updated - fast).abs().max() > 1e-2, param.shape  # the update matters ...
        assert torch.allclose(updated, _equation_reference(layer, x), atol=1e-5)  # ... and is seen
        fast = updated


# --- the sparse kernel (sparse_kernel.py): only the selected experts, against autograd on the gathered form ---


@needs_sparse_kernel
@pytest.mark.parametrize("n, d_in, d_out, e, r, k", [
    (50, 12, 10, 4, 3, 2),      # widths below one vector (scalar tails only), rank < 8
    (40, 70, 37, 6, 11, 3),     # 32-, 16- and scalar column blocks; rank 8 + 3 (two row groups)
    (64, 96, 48, 8, 8, 2),      # the vector paths only
    (9, 33, 17, 16, 4, 1),      # more experts than tokens: some experts get none (their gradients are 0)
])
def test_sparse_kernel_matches_autograd(n, d_in, d_out, e, r, k):
    """Output, h and the gradients of x, A, B and the gates equal autograd through the gathered
    (per-token weights) form, for shapes that exercise every block size and remainder of the kernel."""
    torch.manual_seed(0)
    x, a, b = torch.randn(n, d_in), torch.randn(e, r, d_in) / d_in**0.5, torch.randn(e, d_out, r) / r**0.5
    top_i = torch.randn(n, e).topk(k, dim=-1).indices
    gates, y0, dy = torch.rand(n, k), torch.randn(n, d_out), torch.randn(n, d_out)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b, gates)]
    ref = expert_mix_gather(leaves[0], leaves[1], leaves[2], top_i, leaves[3], y0)
    ref.backward(dy)
    got_leaves = [t.clone().requires_grad_(True) for t in (x, a, b, gates)]
    got = sparse_kernel.SparseExpertMix.apply(y0.clone(), got_leaves[0], got_leaves[1], got_leaves[2], top_i, got_leaves[3])
    got.backward(dy)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    for mine, theirs in zip(got_leaves, leaves):
        assert (mine.grad - theirs.grad).abs().max() <= 1e-5 * theirs.grad.abs().max()
    unused = torch.ones(e, dtype=torch.bool)
    unused[top_i.unique()] = False
    if unused.any():
        assert got_leaves[1].grad[unused].abs().max() == 0 and got_leaves[2].grad[unused].abs().max() == 0


@needs_sparse_kernel
@pytest.mark.parametrize("router_kind", ["prototype", "linear"])
@pytest.mark.parametrize("n, d_in, d_out, e, r, k", [
    (300, 70, 37, 4, 11, 2),    # many tokens per expert set: tiles of 4 tokens and their remainders
    (120, 33, 48, 6, 8, 3),     # top-3
])
def test_sparse_layer_matches_autograd(router_kind, n, d_in, d_out, e, r, k):
    """The whole sparse layer (SparseLoraMoe: base, router head, top-k, experts) against autograd through
    torch ops, with upstream gradients on every output (logits, q and gates, as the auxiliary losses give)."""
    torch.manual_seed(0)
    d_q = 5 if router_kind == "prototype" else e
    leaves = {"x": torch.randn(n, d_in), "w0": torch.randn(d_out, d_in) / d_in**0.5, "bias": torch.randn(d_out),
              "w_r": torch.randn(d_q, d_in) / d_in**0.5, "keys": torch.randn(e, d_q),
              "a": torch.randn(e, r, d_in) / d_in**0.5, "b": torch.randn(e, d_out, r) / r**0.5}
    scaling, temperature = 1.5, 0.3
    upstream = {"y": torch.randn(n, d_out), "logits": torch.randn(n, e), "q": torch.randn(n, d_q), "gates": torch.randn(n, k)}

    def run(sparse: bool):
        t = {name: v.clone().requires_grad_(True) for name, v in leaves.items()}
        kn = torch.nn.functional.normalize(t["keys"], dim=-1) if router_kind == "prototype" else None
        if sparse:
            y, logits, q, gates, top_i = sparse_kernel.SparseLoraMoe.apply(
                t["x"], t["w0"], t["bias"], t["w_r"], t["keys"] if kn is not None else None, t["a"], t["b"], k, scaling,
                1.0 / temperature)
        else:
            p = t["x"] @ t["w_r"].t()
            q = torch.nn.functional.normalize(p, dim=-1) if kn is not None else None
            logits = q @ kn.t() / temperature if kn is not None else p
            gates, top_i = top_k_gates(logits, k)
            y = expert_mix_gather(t["x"], t["a"], t["b"], top_i, gates * scaling, torch.nn.functional.linear(t["x"], t["w0"], t["bias"]))
        loss = (y * upstream["y"]).sum() + (logits * upstream["logits"]).sum() + (gates * upstream["gates"]).sum()
        if q is not None:
            loss = loss + (q * upstream["q"]).sum()
        loss.backward()
        return [y, logits, gates, top_i] + [t[name].grad for name in leaves if name != "keys" or kn is not None]

    for got, ref in zip(run(sparse=True), run(sparse=False)):
        assert got is not None and ref is not None and got.shape == ref.shape
        assert (got.double() - ref.double()).abs().max() <= 1e-5 * ref.double().abs().max()


@needs_sparse_kernel
def test_sparse_kernel_cost_does_not_grow_with_experts():
    """The kernel's work is the k selected experts: the same tokens routed to the same experts give the
    same output whether 4 or 64 experts exist (the others are never read: NaN weights there are harmless)."""
    torch.manual_seed(0)
    x, y0 = torch.randn(20, 16), torch.randn(20, 8)
    a, b = torch.randn(64, 4, 16), torch.randn(64, 8, 4)
    top_i = torch.randint(0, 4, (20, 2))
    gates = torch.rand(20, 2)
    small = sparse_kernel.SparseExpertMix.apply(y0.clone(), x, a[:4], b[:4], top_i, gates)
    a[4:], b[4:] = float("nan"), float("nan")
    assert torch.equal(sparse_kernel.SparseExpertMix.apply(y0.clone(), x, a, b, top_i, gates), small)


def test_auto_compute_resolves_and_sparse_outside_its_kernel_is_a_clear_error():
    layer = _layer("auto")
    x = torch.randn(4, 12)
    assert layer._mix_kind(x) == ("sparse" if sparse_kernel.available() else "dense")
    assert layer.to(torch.float64)._mix_kind(x.double()) == "dense"  # the kernel is fp32: dense elsewhere
    sparse = _layer("sparse").to(torch.float64)
    with pytest.raises(ModelError, match="compute='sparse' needs fp32 CPU tensors"):
        sparse(x.double())


@pytest.mark.parametrize("compute", [SPARSE, "dense"])
def test_hooked_base_whose_backward_needs_its_output(compute):
    """A base hook such as sigmoid saves its output for backward: the unfused path must not write into it."""
    torch.manual_seed(1)
    x = torch.randn(6, 12)
    grads = {}
    for kind in (compute, "loop"):
        layer = _layer(kind)
        layer.base_layer.register_forward_hook(lambda module, inputs, out: torch.sigmoid(out))
        layer(x).square().sum().backward()
        grads[kind] = (layer.lora_A.grad, layer.lora_B.grad, layer.router.w_q.grad)
    for got, ref in zip(*grads.values()):  # gradients up to ~150: summation order moves them ~1e-4 relative
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4)  # a write into the saved output moves them by O(1)
