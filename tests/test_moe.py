"""MoE: grouped_mm forward/backward against a naive dense-gate reference, routing invariants, aux loss by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tml.model import ModelConfig, MoE, MoEConfig
from tml.errors import ConfigError

DIM, HIDDEN, E = 16, 24, 4


def reference_moe(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive MoE written from the definition: every expert runs on every token with plain matmuls, and a dense
    [N, E] gate matrix (zero for unchosen experts) weights the results. Returns (output, aux_loss)."""
    xf = x.reshape(-1, x.shape[-1])
    logits = xf @ moe.gate.weight.T
    scores = logits.softmax(-1) if moe.score_func == "softmax" else logits.sigmoid()
    top, idx = scores.topk(moe.top_k, dim=-1)
    if moe.route_norm:
        top = top / top.sum(-1, keepdim=True)
    top = top * moe.route_scale
    gates = torch.zeros_like(scores).scatter(1, idx, top)  # [N, E]
    out = torch.zeros_like(xf)
    ex = moe.experts
    for e in range(moe.num_experts):
        h = F.silu(xf @ ex.w1[e].T) * (xf @ ex.w3[e].T)
        out = out + gates[:, e:e + 1] * (h @ ex.w2[e].T)
    if moe.shared_experts is not None:
        s = moe.shared_experts
        out = out + (F.silu(xf @ s.w1.weight.T) * (xf @ s.w3.weight.T)) @ s.w2.weight.T
    probs = scores / scores.sum(-1, keepdim=True)
    frac = torch.zeros(moe.num_experts).scatter_add(0, idx.reshape(-1), torch.ones(idx.numel())) / idx.numel()
    aux = moe.aux_loss_coeff * moe.num_experts * (frac * probs.mean(0)).sum()
    aux = aux + moe.z_loss_coeff * torch.logsumexp(logits, -1).pow(2).mean()
    return out.view_as(x), aux


def make_moe(**overrides) -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_dim=HIDDEN, num_experts=E, **overrides)
    moe = MoE(DIM, cfg)
    with torch.no_grad():  # larger than the 0.02 init so routing and outputs are far from zero
        for p in moe.parameters():
            p.normal_(std=0.3)
    return moe


def assert_matches_reference(moe, x, out, r, reference) -> None:
    """Backpropagate ``(out * r).sum() + aux`` through ``moe`` and through ``reference() -> (out, aux)`` on the same
    weights and input; forward, aux loss, input and parameter gradients must agree."""
    ((out * r).sum() + moe.last_aux_loss).backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters()}
    got_x = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    ref, ref_aux = reference()
    ((ref * r).sum() + ref_aux).backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.last_aux_loss, ref_aux, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_x, x.grad, atol=1e-5, rtol=1e-5)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-5, msg=f"grad of {n}")


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("route_norm", [False, True])
def test_matches_naive_reference_forward_and_grads(score_func, top_k, shared, route_norm):
    moe = make_moe(score_func=score_func, top_k=top_k, num_shared_experts=shared, route_norm=route_norm,
                   route_scale=1.5, z_loss_coeff=1e-3)
    x = torch.randn(3, 7, DIM, requires_grad=True)
    r = torch.randn(3, 7, DIM)  # random cotangent: exercises a generic (non-broadcast) output gradient

    assert_matches_reference(moe, x, moe(x), r, lambda: reference_moe(moe, x))


def test_backward_through_plain_sum():
    """out.sum() sends a broadcast (stride-0) gradient, which grouped_mm's backward rejects unless handled."""
    moe = make_moe(top_k=2)
    moe(torch.randn(1, 6, DIM)).sum().backward()
    assert moe.experts.w1.grad is not None and torch.isfinite(moe.experts.w2.grad).all()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_token_gets_exactly_top_k_distinct_experts(top_k):
    moe = make_moe(top_k=top_k, route_norm=True)
    x = torch.randn(50, DIM)
    weights, experts, probs, _ = moe.route(x)
    assert experts.shape == (50, top_k) and weights.shape == (50, top_k)
    assert all(len(set(row.tolist())) == top_k for row in experts)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))  # route_norm on, route_scale 1
    torch.testing.assert_close(probs.sum(-1), torch.ones(50))
    moe(x.view(5, 10, DIM))
    counts = moe.last_expert_counts
    assert counts.shape == (E,) and int(counts.sum()) == 50 * top_k
    assert torch.equal(counts, torch.bincount(experts.reshape(-1), minlength=E))


def test_aux_loss_is_one_times_coeff_for_uniform_router():
    """All-zero router logits: P_e = 1/E for every expert. Whatever experts the tie-break picks, the assignment
    fractions f_e sum to 1, so E * sum_e f_e * P_e = E * (1/E) * 1 = 1, for any top_k."""
    for top_k in (1, 2, 3):
        moe = make_moe(top_k=top_k, aux_loss_coeff=0.01)
        with torch.no_grad():
            moe.gate.weight.zero_()
        moe(torch.randn(2, 9, DIM))
        assert moe.last_aux_loss.item() == pytest.approx(0.01, rel=1e-6)


def test_aux_and_z_loss_by_hand():
    """E = 2, top_1, 3 tokens. Router logits (ln 3, 0), (ln 3, 0), (0, ln 3) give softmax (3/4, 1/4), (3/4, 1/4),
    (1/4, 3/4): expert 0 gets 2 of 3 tokens, expert 1 gets 1.
      f = (2/3, 1/3); P = (7/12, 5/12); aux = 2 * (2/3 * 7/12 + 1/3 * 5/12) = 19/18.
      every token's logsumexp is ln(3 + 1) = ln 4, so z = (ln 4)^2."""
    moe = MoE(4, MoEConfig(hidden_dim=4, num_experts=2, top_k=1, aux_loss_coeff=0.1, z_loss_coeff=0.01))
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor([[math.log(3), 0, 0, 0], [0, math.log(3), 0, 0]]))
    x = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
    moe(x)
    assert moe.last_expert_counts.tolist() == [2, 1]
    expected = 0.1 * 19 / 18 + 0.01 * math.log(4) ** 2
    assert moe.last_aux_loss.item() == pytest.approx(expected, rel=1e-6)
    # the terms before their coefficients (switch, seq (off), z), for the metrics
    assert moe.last_router_terms.tolist() == pytest.approx([19 / 18, 0.0, math.log(4) ** 2], rel=1e-6)


def test_empty_input():
    moe = make_moe(top_k=2)
    x = torch.randn(1, 0, DIM, requires_grad=True)
    out = moe(x)
    (out.sum() + moe.last_aux_loss).backward()
    assert out.shape == (1, 0, DIM) and moe.last_expert_counts.sum() == 0
    assert moe.last_aux_loss.item() == 0.0


def test_top_k_above_num_experts_is_a_config_error():
    cfg = ModelConfig(moe=MoEConfig(num_experts=8, top_k=9))
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k=9 > model\.moe\.num_experts=8"):
        cfg.validate()


@pytest.mark.parametrize("overrides, key", [
    (dict(dim=130, n_heads=1), r"model\.dim=130"),
    (dict(moe=MoEConfig(hidden_dim=6)), r"model\.moe\.hidden_dim=6"),
    (dict(moe=MoEConfig(score_func="relu")), r"model\.moe\.score_func"),
    (dict(dim=128, n_heads=4, n_kv_heads=3), r"model\.n_kv_heads=3"),
    (dict(dim=96, n_heads=32), r"head dim"),
    (dict(dense_layers=5), r"model\.dense_layers=5"),
    (dict(moe=MoEConfig(top_k=1, route_norm=True)), r"model\.moe\.route_norm=true with model\.moe\.top_k=1"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**overrides).validate()


def test_dense_dims_not_multiple_of_four_are_fine_without_moe():
    ModelConfig(dim=130, n_heads=1, n_layers=2, dense_layers=2).validate()


def reference_routing(moe: MoE, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token Python loop from the definitions: group-limited top-k (group score = sum of its best 2 selection
    scores), capacity in token order, balancing losses over the valid tokens. x [B, T, dim], valid bool [B, T].
    Returns (output [B, T, dim], aux loss)."""
    B, T, _ = x.shape
    E, k, G = moe.num_experts, moe.top_k, moe.n_groups
    logits = x @ moe.gate.weight.T
    scores = logits.softmax(-1) if moe.score_func == "softmax" else logits.sigmoid()
    per_group = E // G
    capacity = math.ceil(moe.capacity_factor * B * T * k / E) if moe.capacity_factor else None
    taken = [0] * E
    out = torch.zeros_like(x)
    f_all, f_row = torch.zeros(E), torch.zeros(B, E)
    for b in range(B):
        for t in range(T):
            sel = (scores[b, t] + moe.expert_bias).tolist()
            gscore = [sum(sorted(sel[g * per_group:(g + 1) * per_group], reverse=True)[:2]) for g in range(G)]
            groups = sorted(range(G), key=lambda g: -gscore[g])[:moe.topk_groups]
            allowed = [e for e in range(E) if e // per_group in groups]
            chosen = sorted(allowed, key=lambda e: -sel[e])[:k]
            w = scores[b, t, chosen]
            if moe.route_norm:
                w = w / w.sum()
            w = w * moe.route_scale
            for e, we in zip(chosen, w):
                if valid[b, t]:
                    f_all[e] += 1
                    f_row[b, e] += 1
                # capacity is first come, first served over every position in (b, t) order
                taken[e] += 1
                if capacity is not None and taken[e] > capacity:
                    continue
                ex = moe.experts
                h = F.silu(x[b, t] @ ex.w1[e].T) * (x[b, t] @ ex.w3[e].T)
                out[b, t] = out[b, t] + we * (h @ ex.w2[e].T)
    probs = scores / scores.sum(-1, keepdim=True)
    v = valid.float()
    n = v.sum()
    aux = moe.aux_loss_coeff * E * (f_all / (n * k) * (probs * v[..., None]).sum((0, 1)) / n).sum()
    seq = torch.stack([(f_row[b] / (v[b].sum() * k) * (probs[b] * v[b, :, None]).sum(0) / v[b].sum()).sum()
                       for b in range(B) if v[b].sum() > 0]).mean()
    aux = aux + moe.seq_aux_loss_coeff * E * seq
    aux = aux + moe.z_loss_coeff * (torch.logsumexp(logits, -1).pow(2) * v).sum() / n
    return out, aux


@pytest.mark.parametrize("opts", [
    dict(score_func="sigmoid", route_norm=True, n_groups=2, topk_groups=1, top_k=2),
    dict(score_func="softmax", seq_aux_loss_coeff=0.1, capacity_factor=0.75, top_k=2),
    dict(score_func="sigmoid", seq_aux_loss_coeff=0.1, z_loss_coeff=1e-3, capacity_factor=1.0, top_k=1,
         num_shared_experts=0),
])
def test_group_limited_capacity_seq_loss_and_padding_match_loop(opts):
    moe = make_moe(**opts)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.05, -0.05, 0.0, 0.02]))  # the selection bias takes part
    x = torch.randn(3, 5, DIM, requires_grad=True)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[1, 3:] = False  # packing padding at the end of row 1 ...
    valid[2] = False  # ... and a row that is all padding
    out = moe(x, valid)
    assert_matches_reference(moe, x, out, torch.randn_like(out), lambda: reference_routing(moe, x, valid))
    assert int(moe.last_expert_counts.sum()) == int(valid.sum()) * moe.top_k


def test_capacity_drops_exactly_the_overflow():
    """Every token prefers expert 0 (top-1): with capacity ceil(1.0 * 8 / 4) = 2 only tokens 0 and 1 get an
    expert output; the other six get zero."""
    moe = make_moe(top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 10.0
    x = torch.randn(1, 8, DIM).abs() + 0.1  # positive first channel: expert 0 wins everywhere
    out = moe(x)
    assert (out[0, :2].abs().sum(-1) > 0).all() and (out[0, 2:] == 0).all()
    assert moe.last_expert_counts.tolist() == [8, 0, 0, 0]  # load counts what was routed, before dropping


def test_bias_balancing_moves_skewed_router_toward_uniform():
    """A router whose logits favour expert 0 for every input: with load_balance_coeff the selection bias climbs for
    starved experts until the load is close to uniform; without it the load stays skewed. Weights are not trained."""
    torch.manual_seed(1)
    moe = MoE(DIM, MoEConfig(hidden_dim=HIDDEN, num_experts=E, top_k=1, load_balance_coeff=0.01,
                             aux_loss_coeff=0.0, score_func="sigmoid"))
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.05)
        moe.gate.weight[0] += 0.3  # expert 0's logit grows with the (positive-mean) inputs
    x = torch.randn(4, 64, DIM) + 1.0

    def max_over_mean() -> float:
        moe(x)
        c = moe.last_expert_counts.float()
        return float(c.max() / c.mean())

    before = max_over_mean()
    assert before > 3.0  # skewed: expert 0 takes most tokens
    for _ in range(200):
        moe(x)
        moe.update_bias(moe.last_expert_counts)
    after = max_over_mean()
    assert after < 1.3, (before, after)
    assert moe.expert_bias[0] < 0 < moe.expert_bias[1:].min() + 0.02


def test_megablocks_backend_without_package_names_the_extra():
    try:
        import grouped_gemm  # noqa: F401
        pytest.skip("grouped_gemm (the MegaBlocks backend) is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match=r"make setup-gpu"):
        MoE(DIM, MoEConfig(hidden_dim=HIDDEN, num_experts=E, expert_backend="megablocks"))


@pytest.mark.parametrize("capacity_factor", [0.0, 0.6])
def test_cpu_gather_dispatch_equals_gpu_permute_dispatch(capacity_factor):
    """The two token dispatch strategies (CPU: gather + index_add; GPU: repeat + permutation, no atomics) give the
    same output and gradients, dropless and with capacity dropping."""
    moe = make_moe(top_k=2, num_shared_experts=1, capacity_factor=capacity_factor, aux_loss_coeff=1e-2)
    x = torch.randn(2, 9, DIM, requires_grad=True)
    r = torch.randn(2, 9, DIM)
    results = []
    for dispatch in ("_dispatch_gather", "_dispatch_permute"):
        moe.zero_grad()
        x.grad = None
        if dispatch == "_dispatch_permute":  # force the GPU strategy on CPU
            moe._dispatch_gather = moe._dispatch_permute
        out = moe(x)
        ((out * r).sum() + moe.last_aux_loss).backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters()}))
    del moe._dispatch_gather
    (o0, gx0, gp0), (o1, gx1, gp1) = results
    torch.testing.assert_close(o0, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx0, gx1, atol=1e-5, rtol=1e-5)
    for n in gp0:
        torch.testing.assert_close(gp0[n], gp1[n], atol=1e-5, rtol=1e-5, msg=f"grad of {n}")


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("shared", [0, 1])
def test_decode_equals_forward_and_reference_on_all_paths(shared, dense):
    """``MoE.decode`` (streaming inference) gives the training forward's output, and the naive reference's, for a
    few tokens (every expert on every token when the layer is small, ``DECODE_DENSE_MAX``, else its per-expert
    loop) and for more than ``DECODE_LOOP_MAX`` (the training dispatch); it leaves the router statistics of the last
    training forward alone."""
    moe = make_moe(top_k=2, num_shared_experts=shared).eval()
    moe.DECODE_DENSE_MAX = (moe.DECODE_LOOP_MAX + 5) * E * DIM * HIDDEN if dense else 0
    for n in (1, 3, moe.DECODE_LOOP_MAX, moe.DECODE_LOOP_MAX + 5):
        x = torch.randn(1, n, DIM)
        with torch.no_grad():
            full = moe(x)
            stats = moe.last_expert_counts
            got = moe.decode(x)
            ref, _ = reference_moe(moe, x)
        assert moe.last_expert_counts is stats
        torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_decode_of_one_token_is_the_expert_loop_bit_for_bit():
    """One session's output position skips the loop's sort, gathers and scatter (``MoE._decode_one``) and sums its
    experts in the loop's order: the same bits as ``_decode_loop``, with and without a shared expert."""
    for shared in (0, 1):
        moe = make_moe(top_k=3, num_shared_experts=shared).eval()
        moe.DECODE_DENSE_MAX = 0
        for seed in range(5):
            x = torch.randn(1, DIM, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                weights, experts, _, _ = moe.route(x)
                flat = experts.reshape(-1)
                loop = moe._decode_loop(x, weights, flat, flat.argsort(stable=True))
                assert torch.equal(moe._decode_one(x, weights, experts), loop)
                got = moe.decode(x[None])[0]
            assert torch.equal(got, loop if not shared else loop + moe.shared_experts(x))
