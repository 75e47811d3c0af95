"""InteractionModel end to end on hand-built multimodal batches: shapes, embedding placement, init losses,
packing invariance, overfitting one batch."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import C, NB, P, S, SLOTS, TURN, make_batch, tiny_cfg
from tml.model import (DMelBagEmbedding, HeadsConfig, InteractionModel, ModelConfig, MoE, MoEConfig, compute_losses,
                       param_counts)
from tml.streams.batch import Batch
from tml.errors import ConfigError
from tml.streams.layout import Stream
from tml.streams.modalities import Kind


def test_forward_backward_shapes_and_init_losses():
    torch.manual_seed(0)
    cfg = ModelConfig()  # the default tiny config: vocab 512, 8 experts top-2, all layers MoE
    model = InteractionModel(cfg)
    batch = make_batch([[3, 2], [4]], L=5 * TURN, vocab=cfg.vocab_size)
    out = model(batch)
    n_text, n_audio = int((batch.target_kind == Kind.TEXT).sum()), int((batch.target_kind == Kind.AUDIO).sum())
    # 9 micro-turns; every model audio slot is a target (the slot before it predicts it, whatever its kind)
    assert n_text > 0 and n_audio == 9 * 5
    assert out.hidden.shape == (2, batch.shape[1], cfg.dim)
    assert out.text_logits.shape == (n_text, cfg.vocab_size)
    assert out.audio_logits.shape == (n_audio, S, C, NB)
    assert out.expert_counts.shape == (cfg.n_layers, cfg.moe.num_experts)
    # 9 micro-turns of real tokens in 2 rows of 5: the packing padding of row 2 is not counted
    assert batch.num_tokens() == 9 * TURN < 2 * batch.shape[1]
    assert (out.expert_counts.sum(1) == batch.num_tokens() * cfg.moe.top_k).all()
    losses = compute_losses(out, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    # At init the logits are small (std ~ init_std * sqrt(dim) ~ 0.23), so each prediction is close to uniform:
    # CE ~ ln(classes) + var/2; the target's own logit varies it by ~0.23 per target, ~0.04 over these ~36 targets.
    assert losses["loss/text"].item() == pytest.approx(math.log(cfg.vocab_size) + 0.23 ** 2 / 2, abs=0.15)
    assert losses["loss/audio"].item() == pytest.approx(math.log(NB), abs=0.1)
    # aux: per layer coeff * (>= 1, ~1 near-uniform routing at init)
    assert cfg.n_layers * 0.01 <= losses["loss/aux"].item() < cfg.n_layers * 0.01 * 1.5
    # the floor head: one speak/silent decision per micro-turn (9), a two-way prediction near 1/2 at init: its logit
    # (bias 0, weights std 0.02 on unit-RMS hidden states: sd 0.23, shared by similar positions) within 3 sd of 0
    assert out.floor_logits.shape == out.floor_targets.shape == (9,)
    assert math.log(1 + math.exp(-0.7)) < losses["loss/floor"].item() < math.log(1 + math.exp(0.7))
    torch.testing.assert_close(losses["loss"], losses["loss/text"] + losses["loss/audio"] + losses["loss/aux"]
                               + losses["loss/floor"])
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no or non-finite grad: {missing}"


def test_audio_target_count_is_hand_derivable():
    """With no empty slots each micro-turn has 4 text targets (the last input slot predicts text 0, text j predicts
    text j+1) and 5 audio targets (text 3 predicts audio 0, audio j predicts audio j+1); 3 micro-turns in all."""
    batch = make_batch([[2], [1]], L=3 * TURN, vocab=50, empty_text=0.0)
    assert int((batch.target_kind == Kind.TEXT).sum()) == 3 * 4
    assert int((batch.target_kind == Kind.AUDIO).sum()) == 3 * 5


def test_embedding_places_each_payload_at_its_position():
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg())
    batch = make_batch([[2, 1], [2]], L=3 * TURN + 5, vocab=128)
    emb = model.embed
    x = emb(batch) - emb.stream(batch.stream)
    torch.testing.assert_close(x[batch.kind == Kind.AUDIO], emb.audio(batch.audio_bins))
    torch.testing.assert_close(x[batch.kind == Kind.PATCH], emb.patch(batch.patches, batch.patch_rc))
    torch.testing.assert_close(x[batch.kind == Kind.TEXT], emb.text(batch.text_ids[batch.kind == Kind.TEXT]))
    pad = batch.kind == Kind.PAD
    torch.testing.assert_close(x[pad], emb.pad.expand(int(pad.sum()), -1))


def test_dmel_bag_is_sum_of_per_channel_tables():
    torch.manual_seed(0)
    bag = DMelBagEmbedding(frames=S, n_mels=C, bins=NB, dim=8)
    bins = torch.randint(0, NB, (3, S, C))
    tables = bag.table.weight.view(S, C, NB, 8)
    expected = torch.stack([sum(tables[s, c, bins[n, s, c]] for s in range(S) for c in range(C)) for n in range(3)])
    torch.testing.assert_close(bag(bins), expected, atol=1e-5, rtol=1e-5)


def test_packed_documents_are_independent():
    """Document 1 of a packed row gives the same hidden states and logits as the same document alone."""
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg())
    alone = make_batch([[2]], L=2 * TURN, vocab=128, seed=3)
    first = make_batch([[1]], L=TURN, vocab=128, seed=4)
    def cat(a, b, f):  # [B, L] fields side by side in one row; row payloads one after the other
        return torch.cat([a, b], dim=0 if a.ndim != 2 or f == "patch_rc" else 1)
    core = ("kind", "stream", "micro_turn", "position_ids", "doc_ids", "target_kind")
    packed = Batch(**{f: cat(getattr(first, f), getattr(alone, f), f) for f in core},
                   payload={f: cat(first.payload[f], alone.payload[f], f) for f in first.payload})
    packed.doc_ids[0, TURN:] = 1  # the seam needs no target fix: doc 1 starts with an input slot
    packed.validate()
    out_p, out_a = model(packed), model(alone)
    torch.testing.assert_close(out_p.hidden[0, TURN:], out_a.hidden[0], atol=1e-5, rtol=1e-5)
    n_text_first = int((first.target_kind == Kind.TEXT).sum())
    n_audio_first = int((first.target_kind == Kind.AUDIO).sum())
    torch.testing.assert_close(out_p.text_logits[n_text_first:], out_a.text_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.audio_logits[n_audio_first:], out_a.audio_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slots, has_text, has_audio", [
    (SLOTS, False, True),  # every text slot empty
    ([(Stream.USER, Kind.AUDIO, 5), (Stream.MODEL, Kind.TEXT, 3)], True, False),  # a text-only output layout
    ([(Stream.USER, Kind.AUDIO, 5), (Stream.BACKGROUND, Kind.TEXT, 2)], False, False),  # inputs only
])
def test_batch_without_text_or_audio_targets(slots, has_text, has_audio):
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg())
    empty_text = 1.0 if slots is SLOTS else 0.0
    batch = make_batch([[2]], L=2 * sum(c for _, _, c in slots), vocab=128, slots=slots, empty_text=empty_text)
    out = model(batch)
    assert (out.text_logits.shape[0] > 0) == has_text and (out.audio_logits.shape[0] > 0) == has_audio
    losses = compute_losses(out, batch)
    assert (losses["loss/text"].item() != 0.0) == has_text and (losses["loss/audio"].item() != 0.0) == has_audio
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()  # differentiable even with no targets at all (through the aux loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg())
    batch = make_batch([[2, 1], [3]], L=3 * TURN, vocab=128, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(15):
        losses = compute_losses(model(batch), batch)
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    last = {k: v.item() for k, v in compute_losses(model(batch), batch).items()}
    assert last["loss/text"] < 0.5 * first["loss/text"], (first, last)
    assert last["loss/audio"] < 0.9 * first["loss/audio"], (first, last)


def test_tied_text_embeddings_share_one_parameter():
    model = InteractionModel(tiny_cfg(heads=HeadsConfig(text="tied")))
    assert model.text_head.proj.weight is model.embed.text.weight
    untied = InteractionModel(tiny_cfg())
    assert param_counts(untied)["total"] - param_counts(model)["total"] == 128 * 64


def test_param_counts_by_hand():
    cfg = ModelConfig()
    counts = param_counts(InteractionModel(cfg))
    d, h, E, k = cfg.dim, cfg.moe.hidden_dim, cfg.moe.num_experts, cfg.moe.top_k
    attn = 4 * d * d  # n_kv_heads == n_heads
    moe = d * E + E * 3 * h * d
    block = attn + moe + 2 * d
    w = d // 4
    hmlp = (3 * 100 * w + w) + 2 * w + (w * 4 * w + w) + 2 * w + (w * 4 * d + d) + 2 * d + 2 * cfg.max_patch_grid * d
    embed = cfg.vocab_size * d + S * C * NB * d + hmlp + d + len(Stream) * d
    floor = d + 1  # the floor head: one logit with a bias
    total = embed + cfg.n_layers * block + d + d * cfg.vocab_size + d * S * C * NB + floor
    assert counts["total"] == total
    assert counts["active"] == total - cfg.n_layers * (E - k) * 3 * h * d


def test_meta_device_build_and_errors():
    with torch.device("meta"):
        big = InteractionModel(ModelConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, vocab_size=32000,
                                           moe=MoEConfig(hidden_dim=512, num_experts=64, top_k=4)))
    c = param_counts(big)
    assert c["total"] > c["active"] > 0
    model = InteractionModel(tiny_cfg(max_positions=TURN))
    with pytest.raises(ConfigError, match="model.max_positions"):
        model(make_batch([[2]], L=2 * TURN, vocab=128))
    with pytest.raises(ConfigError, match="model.n_mels"):
        InteractionModel(tiny_cfg(n_mels=40))(make_batch([[1]], L=TURN, vocab=128))
    assert len(model.moe_layers()) == 1 and isinstance(model.layers[1].mlp, MoE)


def test_word_text_loss_skips_empty_slots_by_hand():
    # Call the first target's token the empty-slot token: loss/text_words is the CE over the other targets alone.
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg())
    batch = make_batch([[2]], L=2 * TURN, vocab=128, seed=3, empty_text=0.0)
    out = model(batch)
    targets = batch.target_text[batch.target_kind == Kind.TEXT]
    pad = int(targets[0])
    words = targets != pad
    assert words.any() and (~words).any()
    want = torch.nn.functional.cross_entropy(out.text_logits[words], targets[words])
    got = compute_losses(out, batch, text_pad_id=pad)
    assert got["loss/text_words"].item() == pytest.approx(want.item(), rel=1e-6)
    assert "loss/text_words" not in compute_losses(out, batch)


def test_decode_layout_changes_strides_not_values():
    """``decode_layout`` stores the blocks' and heads' weights column-major (experts per expert), leaves a weight
    tied to the text embedding and the embeddings alone, keeps every value, and the forward stays the same function
    (equal up to float rounding; gradients flow as before). An MoE that decodes dense keeps its experts' w1 and w3
    row-major (all experts one matrix for ``MoE._decode_dense``), and its decode is the same function as well."""
    model = InteractionModel(tiny_cfg(heads=HeadsConfig(text="tied")))
    moe = model.layers[1].mlp
    assert moe.decodes_dense(1)  # the test config's layer is small
    batch = make_batch([[2]], 2 * TURN, 128)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(batch)
        ref_decode = moe.decode(x)
    assert model.decode_layout() is model
    model.decode_layout()  # idempotent
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        rows = n.endswith(("experts.w1", "experts.w3"))  # the dense-decoding layer's, see below
        transposed = p.ndim >= 2 and n.startswith(("layers.", "audio_head.")) and min(p.shape[-2:]) > 1 and not rows
        assert p.is_contiguous() != transposed and (not transposed or p.mT.is_contiguous()), n
    assert model.text_head.proj.weight is model.embed.text.weight and model.embed.text.weight.is_contiguous()
    assert moe.experts.w2[0].mT.is_contiguous() and moe.experts.w1.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(moe.decode(x), ref_decode, atol=1e-6, rtol=1e-5)
    # A layer too large to decode dense: every expert's matrix column-major (its decode loops over its experts).
    moe.DECODE_DENSE_MAX = 0
    model.decode_layout()
    assert all(w[0].mT.is_contiguous() for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3))
    del moe.DECODE_DENSE_MAX
    model.decode_layout()
    assert moe.experts.w1.is_contiguous() and moe.experts.w3.is_contiguous()
    out = model(batch)
    torch.testing.assert_close(out.text_logits, ref.text_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.audio_logits, ref.audio_logits, atol=1e-5, rtol=1e-5)
    out.text_loss.mean().backward()
    assert all(p.grad is not None for p in model.layers.parameters() if p.requires_grad and p.ndim > 1)
