"""LoraMoeLinear against its equation, computed token by token; config serialisation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medmoe.errors import ModelError
from medmoe.loramoe import LoraMoeConfig, LoraMoeLinear
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


@pytest.mark.parametrize("compute", ["dense", "gather", "loop"])
def test_layer_matches_equation(compute):
    layer = _layer(compute)
    x = torch.randn(7, 12)
    assert torch.allclose(layer(x), _equation_reference(layer, x), atol=1e-5)


def test_batched_shapes_and_gradients_agree_across_compute_kinds():
    x = torch.randn(2, 5, 12)
    grads, outs = {}, {}
    for compute in ("dense", "gather", "loop"):
        layer = _layer(compute)
        y = layer(x)
        assert y.shape == (2, 5, 10)
        (y.square().sum()).backward()
        outs[compute] = y.detach()
        grads[compute] = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), layer.router.w_q.grad.clone())
    for compute in ("gather", "loop"):
        assert torch.allclose(outs[compute], outs["dense"], atol=1e-5)
        for g, g_ref in zip(grads[compute], grads["dense"]):
            assert torch.allclose(g, g_ref, atol=1e-4)


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


def test_dense_with_active_dropout_matches_the_loop_reference():
    """With dropout on, the experts read dropout(x) and the router x: the unfused dense path."""
    x = torch.randn(2, 5, 12)
    outs, grads, layers = {}, {}, {}
    for compute in ("dense", "loop"):
        layer = layers[compute] = _layer(compute, dropout=0.5)
        layer.train()
        torch.manual_seed(3)  # the same dropout mask for both
        y = layer(x)
        y.square().sum().backward()
        outs[compute] = y.detach()
        grads[compute] = (layer.lora_A.grad, layer.lora_B.grad, layer.router.w_q.grad)
    assert torch.allclose(outs["dense"], outs["loop"], atol=1e-5)
    for g, g_ref in zip(grads["dense"], grads["loop"]):
        assert torch.allclose(g, g_ref, atol=1e-4)
    dense = layers["dense"].eval()  # no dropout at inference: the fused path, and the equation again
    assert torch.allclose(dense(x[0]), _equation_reference(dense, x[0]), atol=1e-5)


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


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("router_kind", ["prototype", "linear"])
def test_fused_layer_matches_the_loop_reference(dtype, tol, router_kind):
    """Output and every gradient (x, A, B, router) of the fused path equal the per-expert loop's."""
    contrastive = "prototype" if router_kind == "prototype" else "none"
    x = torch.randn(3, 7, 12, dtype=dtype)
    results = {}
    for compute in ("dense", "loop"):
        layer = _layer(compute, router_kind=router_kind, contrastive_kind=contrastive).to(dtype)
        assert layer._fusable(x.reshape(-1, 12)) == (compute == "dense")
        x_in = x.clone().requires_grad_(True)
        y = layer(x_in)
        (y * torch.linspace(-1, 1, y.shape[-1], dtype=dtype)).square().sum().backward()
        results[compute] = [y.detach(), x_in.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
    for got, ref in zip(results["dense"], results["loop"]):
        assert got is not None and ref is not None
        assert (got - ref).abs().max() <= tol * ref.abs().max()


def test_fused_layer_auxiliary_losses_match_the_loop_reference():
    """Balance, z and contrastive losses (router inputs collected by the layer) and their gradients."""
    x = torch.randn(2, 9, 12)
    results = {}
    for compute in ("dense", "loop"):
        layer = _layer(compute, contrastive_tokens=None, queue_size=0)
        layer.context.compute_aux = layer.context.track_load = True
        layer(x)
        losses = layer.aux_losses
        assert set(losses) == {"balance", "z", "contrastive"}
        sum(losses.values()).backward()
        results[compute] = [losses[k].detach() for k in sorted(losses)] + [layer.router.w_q.grad, layer.router.keys.grad, layer.expert_load.clone()]
    for got, ref in zip(results["dense"], results["loop"]):
        assert torch.allclose(got, ref, atol=1e-6)


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


def test_inference_path_matches_training_path_and_follows_weight_updates():
    """Without gradients the layer keeps its stacked weights between calls (`_forward_inference`); it
    must equal the autograd path, and see in-place updates of A, B and the router (optimizer steps)."""
    layer = _layer()
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
