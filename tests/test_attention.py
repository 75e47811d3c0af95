"""Attention: document masking never leaks across packed documents; RoPE scores depend on position differences."""

from __future__ import annotations

import torch

from tml.model import Attention, InteractionModel, ModelConfig, MoEConfig, apply_rope, rope_cos_sin
from tml.streams.batch import IGNORE_INDEX, Batch
from tml.streams.layout import Stream
from tml.streams.modalities import Kind


def text_batch(docs_per_row: list[list[torch.Tensor]], L: int) -> Batch:
    """Rows of packed MODEL-stream text documents (token tensors), padded to L; each token predicts the next."""
    B = len(docs_per_row)
    z = lambda: torch.zeros(B, L, dtype=torch.long)  # noqa: E731
    kind, stream, pos, text = z(), z(), z(), z()
    doc = torch.full((B, L), -1)
    for b, docs in enumerate(docs_per_row):
        at = 0
        for d, toks in enumerate(docs):
            n = len(toks)
            sl = slice(at, at + n)
            kind[b, sl], stream[b, sl], doc[b, sl] = Kind.TEXT, Stream.MODEL, d
            pos[b, sl], text[b, sl] = torch.arange(n), toks
            at += n
    tk = torch.full((B, L), int(Kind.PAD))
    tk[:, :-1] = torch.where(doc[:, :-1] == doc[:, 1:], kind[:, 1:], int(Kind.PAD)) * (doc[:, :-1] >= 0)
    tt = torch.full((B, L), IGNORE_INDEX)
    tt[:, :-1] = torch.where(tk[:, :-1] == Kind.TEXT, text[:, 1:], IGNORE_INDEX)
    return Batch(kind=kind, stream=stream, micro_turn=z(), position_ids=pos, doc_ids=doc, target_kind=tk,
                 payload=dict(text_ids=text, audio_bins=torch.zeros(0, 4, 80, dtype=torch.long),
                              patches=torch.zeros(0, 40, 40, 3, dtype=torch.uint8),
                              patch_rc=torch.zeros(0, 2, dtype=torch.long), target_text=tt,
                              target_audio=torch.zeros(0, 4, 80, dtype=torch.long))).validate()


def test_attention_mask_does_not_leak_across_documents():
    torch.manual_seed(0)
    attn = Attention(dim=32, n_heads=4, n_kv_heads=2)
    a, b = torch.randint(1, 50, (7,)), torch.randint(1, 50, (9,))
    packed, alone = text_batch([[a, b]], L=20), text_batch([[b]], L=12)
    x_a, x_b = torch.randn(7, 32), torch.randn(9, 32)
    x_packed = torch.cat([x_a, x_b, torch.randn(4, 32)])[None]
    x_alone = torch.cat([x_b, torch.randn(3, 32)])[None]

    def run(batch: Batch, x: torch.Tensor) -> torch.Tensor:
        cos, sin = rope_cos_sin(batch.position_ids, 8, 10000.0)
        return attn(x, cos, sin, batch.attention_mask())

    torch.testing.assert_close(run(packed, x_packed)[0, 7:16], run(alone, x_alone)[0, :9], atol=1e-6, rtol=1e-5)
    # and the first document does not see the second, nor the padding
    first = text_batch([[a]], L=7)
    torch.testing.assert_close(run(packed, x_packed)[0, :7], run(first, x_a[None])[0], atol=1e-6, rtol=1e-5)


def test_model_hidden_of_packed_document_equals_it_alone():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, dense_layers=1,
                      dense_hidden_dim=64, moe=MoEConfig(hidden_dim=32, num_experts=4, top_k=2))
    model = InteractionModel(cfg)
    a, b = torch.randint(1, 64, (10,)), torch.randint(1, 64, (6,))
    packed = model(text_batch([[a, b]], L=20))
    alone = model(text_batch([[b]], L=6))
    torch.testing.assert_close(packed.hidden[0, 10:16], alone.hidden[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.text_logits[9:14], alone.text_logits, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_position_difference():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([[m]]), hd, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[n]]), hd, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for shift in (1, 17, 300):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n), atol=1e-4, rtol=1e-4)
    assert len({round(score(d, 0).item(), 3) for d in range(8)}) == 8  # different offsets, different scores
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity rotation


def test_rope_preserves_norm():
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rope_cos_sin(torch.arange(5).expand(2, 5), 8, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_decode_attention_equals_sdpa_with_grouped_heads_and_a_mask():
    """The one-query path of the streaming step (``decode_attention``) computes what SDPA computes: query head h
    reads kv head h // group, masked keys get no weight (checked against softmax over the visible keys by hand)."""
    from tml.model.attention import decode_attention

    torch.manual_seed(0)
    B, H, Hkv, S, D = 3, 8, 2, 17, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    mask = torch.rand(B, 1, 1, S) > 0.3
    mask[..., 0] = True
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    got = decode_attention(q, k, v, bias)
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                      enable_gqa=True))
    b, h = 2, 5
    keys = mask[b, 0, 0].nonzero().squeeze(1)
    w = (k[b, h // (H // Hkv), keys] @ q[b, h, 0] / D**0.5).softmax(0)
    torch.testing.assert_close(got[b, h, 0], w @ v[b, h // (H // Hkv), keys])
    torch.testing.assert_close(decode_attention(q, k, v, None),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def test_half_cache_attention_is_attention_over_the_rounded_query_keys_and_values():
    """Over a bfloat16 cache (``SessionConfig.cache_dtype``) the streaming step attends as fp32 attention would over
    the query, keys and values rounded to bfloat16, up to one more bfloat16 rounding (the weights' and the output's),
    for one query and for a chunk of queries with a causal mask; the result comes back in the query's dtype."""
    from tml.model.attention import half_cache_attention

    torch.manual_seed(0)
    B, H, Hkv, S, D = 3, 8, 2, 40, 16
    k, v = torch.randn(B, Hkv, S, D).bfloat16(), torch.randn(B, Hkv, S, D).bfloat16()
    for T in (1, 5):
        q = torch.randn(B, H, T, D)
        mask = torch.rand(B, 1, T, S) > 0.3
        mask[..., 0] = True
        bias = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
        got = half_cache_attention(q, k, v, bias)
        assert got.dtype == torch.float32 and got.shape == (B, H, T, D)
        qr, kr, vr = q.bfloat16().float(), k.float(), v.float()
        g = H // Hkv
        scores = (qr @ kr.repeat_interleave(g, 1).transpose(-1, -2)) / D**0.5
        ref = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vr.repeat_interleave(g, 1)
        torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)  # ~3e-3 measured; a wrong mask or head map: ~0.7
