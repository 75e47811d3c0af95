"""Output heads and sampling: the flow head keeps both modes of a two-mode distribution where an MSE head averages
them; the dMel head's likelihood by hand; temperature / top-p sampling; the flow head inside the model; free-running
generation agrees with one teacher-forced forward."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TURN, make_batch, tiny_cfg
from tml.model import (FlowHead, FlowHeadConfig, HeadsConfig, InteractionModel, ModelConfig, compute_losses,
                       bins_to_unit, unit_to_bins)
from tml.model.heads import SILENT_BIN, DMelHead, FloorHead, TextHead
from tml.model.sampling import SamplingConfig, sample_logits
from tml.errors import ConfigError
from tml.streams.layout import Stream
from tml.streams.modalities import IGNORE_INDEX, Kind

NB = 16


def test_flow_head_samples_both_modes_where_mse_head_averages():
    # Three conditions, each with two equally likely 2-value targets (in dMel bins) far apart.
    torch.manual_seed(0)
    K, DIM = 3, 8
    conds = torch.randn(K, DIM)
    modes = torch.tensor([[[2, 12], [12, 2]], [[3, 3], [13, 13]], [[1, 14], [8, 6]]])  # [K, mode, value]
    g = torch.Generator().manual_seed(1)
    head = FlowHead(DIM, 1, 2, NB, FlowHeadConfig(hidden_dim=64, n_layers=2, cond_dropout=0.0, train_repeats=1))
    mse = nn.Sequential(nn.Linear(DIM, 64), nn.SiLU(), nn.Linear(64, 2))  # the same data, regressed with MSE
    opt = torch.optim.Adam([*head.parameters(), *mse.parameters()], lr=3e-3)
    for _ in range(400):
        k, m = torch.randint(0, K, (256,), generator=g), torch.randint(0, 2, (256,), generator=g)
        c, bins = conds[k], modes[k, m].view(256, 1, 2)
        target = bins_to_unit(bins.view(256, 2), NB, torch.rand(256, 2, generator=g))
        loss = head.loss(c, bins).mean() + (mse(c) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    for k in range(K):
        c = conds[k].expand(1000, -1)
        flow = unit_to_bins(head.integrate(c, steps=16, generator=torch.Generator().manual_seed(2)).view(-1, 2), NB)
        avg = unit_to_bins(mse(c).detach(), NB)
        near = lambda b, j: float(((b - modes[k, j]).abs().max(-1).values <= 1).float().mean())  # noqa: E731
        mid = modes[k].float().mean(0)
        at_mid = lambda b: float(((b.float() - mid).abs().max(-1).values <= 1.5).float().mean())  # noqa: E731
        # Statistic: the share of samples within one bin of each mode. Fair coin: 0.5 each.
        assert 0.35 < near(flow, 0) < 0.65 and 0.35 < near(flow, 1) < 0.65, (k, near(flow, 0), near(flow, 1))
        assert at_mid(flow) < 0.05
        assert near(avg, 0) == near(avg, 1) == 0.0 and at_mid(avg) == 1.0  # MSE: the mean of the modes


def test_dmel_log_likelihood_by_hand():
    head = DMelHead(dim=2, frames=1, n_mels=2, bins=3)
    with torch.no_grad():  # channel 0 logits = h0 * (0, 1, 2); channel 1 logits = h1 * (1, 0, 0)
        head.proj.weight.copy_(torch.tensor([[0., 0.], [1., 0.], [2., 0.], [0., 1.], [0., 0.], [0., 0.]]))
    h = torch.tensor([[1.0, 2.0]])
    bins = torch.tensor([[[2, 1]]])
    # channel 0: softmax(0, 1, 2)[2] = e^2 / (1 + e + e^2); channel 1: softmax(2, 0, 0)[1] = 1 / (e^2 + 2)
    want = 2 - math.log(1 + math.e + math.e ** 2) + 0 - math.log(math.e ** 2 + 2)
    assert head.log_prob(h, bins).item() == pytest.approx(want, rel=1e-6)


def test_dmel_loss_is_mean_negative_log_likelihood_per_channel():
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg())
    batch = make_batch([[2]], L=2 * TURN, vocab=128, seed=5)
    out = model(batch)
    logp = model.audio_head.log_prob(out.hidden[batch.target_kind == Kind.AUDIO], batch.target_audio)
    want = -logp.sum() / batch.target_audio.numel()
    assert compute_losses(out, batch)["loss/audio"].item() == pytest.approx(want.item(), rel=1e-5)


def test_head_losses_are_the_fused_reference_losses_bitwise():
    """Each head's per-target loss, averaged by compute_losses, equals the fused mean it replaced (cross-entropy over
    the logits, BCE over the floor logits), and the text and dMel gradients are bitwise those of the fused call."""
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg())
    batch = make_batch([[3, 2], [4]], L=5 * TURN, vocab=128, seed=5)
    out = model(batch)
    is_text = batch.target_kind == Kind.TEXT
    text_t = batch.target_text[is_text]
    words = text_t != 0
    got = compute_losses(out, batch, text_pad_id=0)
    fused = {"loss/text": F.cross_entropy(out.text_logits.float(), text_t),
             "loss/text_words": F.cross_entropy(out.text_logits[words].float(), text_t[words]),
             "loss/audio": F.cross_entropy(out.audio_logits.float().reshape(-1, NB), batch.target_audio.reshape(-1))}
    for k, want in fused.items():
        assert torch.equal(got[k], want), k
    torch.testing.assert_close(got["loss/floor"], F.binary_cross_entropy_with_logits(out.floor_logits.float(),
                                                                                       out.floor_targets))
    for k in ("loss/text", "loss/audio"):
        g_got = torch.autograd.grad(got[k], out.hidden, retain_graph=True)[0]
        g_want = torch.autograd.grad(fused[k], out.hidden, retain_graph=True)[0]
        assert torch.equal(g_got, g_want), k


def test_listen_head_loss_is_the_cross_entropy_of_the_heard_tokens_and_only_trains_where_labelled():
    """With ``model.heads.listen`` and a batch carrying ``heard_text`` (labels on user audio positions), the listen loss is
    the cross-entropy of the listen head's logits at exactly the labelled positions, added to the total with its
    weight; a live batch without labels trains nothing there."""
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg(heads=HeadsConfig(listen=True)))
    batch = make_batch([[3, 2], [4]], L=5 * TURN, vocab=128, seed=5)
    user_audio = (batch.stream == Stream.USER) & (batch.kind == Kind.AUDIO)
    g = torch.Generator().manual_seed(1)
    heard = torch.where(torch.rand(batch.shape, generator=g) < 0.3, torch.randint(1, 128, batch.shape, generator=g), 0)
    heard = torch.where(user_audio, heard, IGNORE_INDEX)
    heard[0, :TURN] = IGNORE_INDEX  # a stretch without a transcript
    labelled = replace(batch, payload={**batch.payload, "heard_text": heard}).validate()
    out = model(labelled)
    where = heard != IGNORE_INDEX
    want = F.cross_entropy(model.listen_head(out.hidden[where]).float(), heard[where])
    got = compute_losses(out, labelled, text_pad_id=0, listen_weight=0.5)
    torch.testing.assert_close(got["loss/listen"], want)
    words = heard[where] != 0
    torch.testing.assert_close(got["loss/listen_words"],
                               F.cross_entropy(model.listen_head(out.hidden[where][words]).float(), heard[where][words]))
    plain = compute_losses(model(batch), batch, text_pad_id=0)  # the same batch without labels: no listen loss
    assert "loss/listen" not in plain
    torch.testing.assert_close(got["loss"], plain["loss"] + 0.5 * want)
    grad = torch.autograd.grad(got["loss/listen"], out.hidden)[0]
    assert (grad.abs().sum(-1) > 0).eq(where).all()  # the head reads exactly the labelled positions


def test_every_content_head_samples_silence_where_the_floor_says_so_and_draws_the_same():
    """Given the micro-turn's decision ``speak``, each content head writes silence (pad text, the silent bin's centre)
    where it is False, the same draws as an all-speaking call where it is True, and advances the generator the same
    (so one session's later draws do not depend on what the floor decided)."""
    torch.manual_seed(0)
    h = torch.randn(6, 16)
    speak = torch.tensor([True, False, True, False, True, False])
    cfg = SamplingConfig(text_temperature=1.0, audio_temperature=1.0)
    heads = [(TextHead(16, 10), {"pad_id": 3}, torch.tensor(3)),
             (DMelHead(16, 2, 3, NB), {}, bins_to_unit(torch.tensor(SILENT_BIN), NB)),
             (FlowHead(16, 2, 3, NB, FlowHeadConfig(hidden_dim=8, n_layers=1, cond_dropout=0.0)), {},
              bins_to_unit(torch.tensor(SILENT_BIN), NB))]
    for head, kw, silent in heads:
        g_all, g_given = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        everyone = head.sample(h, cfg, g_all, speak=torch.ones(6, dtype=torch.bool), **kw)
        given = head.sample(h, cfg, g_given, speak=speak, **kw)
        name = type(head).__name__
        assert torch.equal(given[speak], everyone[speak]), name
        assert (given[~speak] == silent).all() and not (everyone[~speak] == silent).all(), name
        assert torch.equal(g_all.get_state(), g_given.get_state()), name


def _rows_apart(head, h, cfg, seeds, kw, per_row):
    """head.sample for all rows at once with one generator per row, and for each row alone with its own (fresh,
    same seed): (batched, alone stacked, the generators' states after each)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    batched = head.sample(h, cfg, gens, **{k: v for k, v in kw.items()})
    alone, states = [], []
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        alone.append(head.sample(h[i : i + 1], cfg, g, **{k: v[i : i + 1] if k in per_row else v
                                                          for k, v in kw.items()}))
        states.append(g.get_state())
    return batched, alone, [g.get_state() for g in gens], states


SPEAK = torch.tensor([True, False, True, True, False])
FLOW = FlowHeadConfig(hidden_dim=8, n_layers=1, cond_dropout=0.0)


@pytest.mark.parametrize("case", [
    ("text", SamplingConfig(text_temperature=1.0, text_top_p=0.9)),
    ("text", SamplingConfig(text_temperature=1.0, words_given_speech="always")),
    ("text", SamplingConfig(floor="none", text_temperature=0.8)),
    ("dmel", SamplingConfig(audio_temperature=1.0, audio_top_p=0.8)),
    ("dmel+speak", SamplingConfig(audio_temperature=1.0)),
    ("dmel", SamplingConfig(floor="none", audio_temperature=1.0)),
    ("flow+speak", SamplingConfig(flow_steps=2, flow_temperature=0.7)),
    ("floor", SamplingConfig(floor_temperature=0.7)),
], ids=lambda c: f"{c[0]}-{c[1].floor}-{c[1].text_temperature}-{c[1].audio_top_p}-{c[1].words_given_speech}")
def test_batched_sampling_with_a_generator_per_row_equals_each_row_alone(case):
    """A batched session samples all its sessions in one call with one generator per row
    (``tml.model.sampling.Generators``): every head must write, row by row, exactly what that row writes alone with
    its own generator, and leave each generator in the same state (so the sessions' later draws agree too)."""
    name, cfg = case
    torch.manual_seed(0)
    n, dim = SPEAK.numel(), 16
    h = torch.randn(n, dim)
    p_speak = torch.rand(n)
    if name == "text":
        head, kw = TextHead(dim, 12), {"pad_id": 3, "speak": SPEAK, "p_speak": p_speak}
        if cfg.floor == "none":
            kw = {"pad_id": 3}
        with torch.no_grad():  # a pad that is likely but not certain: both the floor and the word draws matter
            head.proj.weight[3].fill_(0.0)
        kw["logits"] = head(h)  # as the session passes them: computed once for all rows
    elif name.startswith("dmel"):
        head, kw = DMelHead(dim, 2, 3, NB), ({"speak": SPEAK} if name.endswith("speak") else {})
        with torch.no_grad():
            head.proj.weight.mul_(30)  # far from uniform: top-p and the silent bin's share bite
        kw["logits"] = head(h)
    elif name.startswith("flow"):
        head, kw = FlowHead(dim, 2, 3, NB, FLOW), {"speak": SPEAK}
        with torch.no_grad():
            head.out.weight.normal_()  # a nonzero flow, so the noise reaches the sample
    else:
        head, kw = FloorHead(dim), {}
    seeds = [10, 11, 12, 13, 14]
    batched, alone, states, alone_states = _rows_apart(head, h, cfg, seeds, kw, per_row=("speak", "p_speak", "logits"))
    if name == "floor":  # the decisions; P(speak) of one row rounds differently from a matmul of five
        assert torch.equal(batched[0], torch.cat([a[0] for a in alone]))
        torch.testing.assert_close(batched[1], torch.cat([a[1] for a in alone]), atol=1e-6, rtol=0)
    elif name.startswith("flow"):  # the same noise; its network's matmuls round differently at 5 rows than at 1
        torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=0)
    else:
        assert torch.equal(batched, torch.cat(alone))
    assert all(torch.equal(a, b) for a, b in zip(states, alone_states))
    # The draws are real: other seeds write something else.
    other, _, _, _ = _rows_apart(head, h, cfg, [s + 100 for s in seeds], kw, per_row=("speak", "p_speak", "logits"))
    first = (lambda x: x[0]) if name == "floor" else (lambda x: x)
    assert not torch.equal(first(other), first(batched))


def test_temperature_zero_is_argmax():
    logits = torch.randn(50, 7, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))
    head = DMelHead(8, 4, 80, NB)
    h = torch.randn(3, 8)
    unit = head.sample(h, SamplingConfig(floor="none", audio_temperature=0.0))
    assert torch.equal(unit_to_bins(unit, NB), head(h).argmax(-1))


def test_sampling_frequencies_match_softmax_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    freq = lambda draws: torch.bincount(draws, minlength=4).float() / draws.numel()  # noqa: E731
    # temperature 1: the softmax itself (3 sigma of a 20000-draw frequency is < 0.011)
    torch.testing.assert_close(freq(sample_logits(logits, 1.0, 1.0, g)), probs, atol=0.011, rtol=0)
    # top_p 0.7: 0.5 < 0.7 <= 0.8, so the nucleus is {0, 1}, renormalised to 0.625 / 0.375
    torch.testing.assert_close(freq(sample_logits(logits, 1.0, 0.7, g)), torch.tensor([0.625, 0.375, 0, 0]),
                               atol=0.011, rtol=0)
    # temperature 0.5 squares the probabilities before renormalising
    torch.testing.assert_close(freq(sample_logits(logits, 0.5, 1.0, g)), probs ** 2 / (probs ** 2).sum(), atol=0.011,
                               rtol=0)
    assert sample_logits(logits[:5], 1.0, 1e-6, g).eq(0).all()  # a tiny top_p keeps only the top class


def test_flow_head_in_model_init_loss_by_hand_and_trains():
    """At init the flow head predicts velocity 0 (adaLN-zero), so the loss is E[(x1 - x0)^2] = E[x1^2] + 1 with x1
    uniform inside its target bin: for bin k, x1 = a + b*u, a = 2k/B - 1, b = 2/B, E[x1^2] = a^2 + a*b + b^2/3."""
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg(heads=HeadsConfig(audio="flow")))
    batch = make_batch([[3], [2]], L=3 * TURN, vocab=128, seed=2)
    out = model(batch)
    assert out.audio_logits is None and out.audio_loss.shape == (int((batch.target_kind == Kind.AUDIO).sum()),)
    a, b = 2 * batch.target_audio.float() / NB - 1, 2 / NB
    want = (a ** 2 + a * b + b ** 2 / 3).mean().item() + 1
    losses = compute_losses(out, batch)
    assert losses["loss/audio"].item() == pytest.approx(want, rel=0.02)
    assert losses["loss/audio_flow"].item() == losses["loss/audio"].item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = losses["loss/audio"].item()
    for _ in range(20):
        losses = compute_losses(model(batch), batch)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    model.eval()
    torch.manual_seed(1)
    assert compute_losses(model(batch), batch)["loss/audio"].item() < 0.8 * first


def test_flow_sampling_solvers_and_guidance():
    torch.manual_seed(0)
    head = FlowHead(16, 4, 80, NB, FlowHeadConfig(hidden_dim=32, n_layers=1, cond_dropout=0.1))
    for m in head.modules():  # give the zero-initialised layers some weight so the flow is not trivial
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    c = torch.randn(5, 16)
    draw = lambda **kw: head.integrate(c, generator=torch.Generator().manual_seed(3), **kw)  # noqa: E731
    assert draw(steps=4, solver="euler").shape == (5, 4, 80)
    # Euler and midpoint converge to the same ODE solution as steps grow; midpoint converges faster.
    exact = draw(steps=256, solver="midpoint")
    err = {s: (draw(steps=8, solver=s) - exact).abs().max().item() for s in ("euler", "midpoint")}
    assert err["midpoint"] < err["euler"], err
    torch.testing.assert_close(draw(guidance=1.0), draw(guidance=1.0))  # deterministic given the generator
    # temperature 0 starts every sample at the origin: the same output whatever the generator draws
    torch.testing.assert_close(draw(temperature=0.0), head.integrate(c, generator=torch.Generator().manual_seed(9),
                                                                  temperature=0.0))
    assert draw(temperature=0.5).std() < draw(temperature=1.0).std()
    assert not torch.allclose(draw(guidance=3.0), draw(guidance=1.0))
    no_null = FlowHead(16, 4, 80, NB, FlowHeadConfig(hidden_dim=32, n_layers=1, cond_dropout=0.0))
    with pytest.raises(ValueError, match="cond_dropout"):
        no_null.integrate(c, guidance=2.0)
    with pytest.raises(ValueError, match="flow_solver"):
        head.integrate(c, solver="rk4")


@pytest.mark.parametrize("audio", ["dmel", "flow"])
def test_free_generation_agrees_with_one_teacher_forced_forward(audio):
    """Generate at temperature 0 (dmel) / fixed noise (flow), then run ONE forward over the generated sequence: the
    hidden state before every model position must predict exactly what was generated there (the incremental path
    through the KV cache equals the full causal forward), and the input positions must be the recording's."""
    from dataclasses import replace

    from tml.audio.dmel import DMelTokenizer
    from tml.eval.generate import generate_model_side
    from tml.streams.interleave import EpisodeTokens
    from tml.streams.layout import LayoutConfig, MicroTurnLayout
    from tml.streams.pack import collate

    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg(heads=HeadsConfig(audio=audio)))
    b = make_batch([[3]], L=3 * TURN, vocab=128, seed=4, empty_text=0.0)
    tok = EpisodeTokens("ep", 3, b.kind[0], b.stream[0], b.micro_turn[0],
                        dict(text_ids=b.text_ids[0], audio_bins=b.audio_bins, patches=b.patches, patch_rc=b.patch_rc))
    cfg = SamplingConfig(floor="none", text_temperature=0.0, audio_temperature=0.0, flow_steps=4, seed=7)
    g = generate_model_side(model, tok, MicroTurnLayout(LayoutConfig()), DMelTokenizer(), cfg)
    model_pos = b.stream[0] == Stream.MODEL
    inputs = ~model_pos
    assert torch.equal(g.text_ids[inputs], tok.text_ids[inputs])
    is_audio = tok.kind == Kind.AUDIO
    assert torch.equal(g.audio_bins[inputs[is_audio]], tok.audio_bins[inputs[is_audio]])
    assert g.model_text.shape == (3, 4) and g.model_audio_unit.shape == (15, 4, 80)
    torch.testing.assert_close(unit_to_bins(g.model_audio_unit, NB), g.audio_bins[model_pos[is_audio]])

    generated = replace(tok, payload={**tok.payload, "text_ids": g.text_ids, "audio_bins": g.audio_bins})
    out = model(collate([[generated]], tok.kind.numel()))
    text_q = torch.nonzero(model_pos & (tok.kind == Kind.TEXT)).flatten()
    assert torch.equal(model.text_head(out.hidden[0, text_q - 1]).argmax(-1), g.text_ids[text_q])
    audio_q = torch.nonzero(model_pos & is_audio).flatten()
    h = out.hidden[0, audio_q - 1]
    if audio == "dmel":
        assert torch.equal(model.audio_head(h).argmax(-1), g.audio_bins[model_pos[is_audio]])
    else:  # the same noise draws, in the same order, one position at a time
        gen = torch.Generator().manual_seed(7)
        want = torch.cat([model.audio_head.integrate(h[i:i + 1], 4, "midpoint", 1.0, gen) for i in range(len(h))])
        torch.testing.assert_close(want, g.model_audio_unit, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key, value", [("audio", "mse"), ("text", "shared")])
def test_bad_head_choice_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"model.heads.{key}"):
        ModelConfig(heads=HeadsConfig(**{key: value})).validate()
    with pytest.raises(ConfigError, match="model.heads.flow.cond_dropout"):
        ModelConfig(heads=HeadsConfig(flow=FlowHeadConfig(cond_dropout=1.0))).validate()


def test_flow_head_with_no_audio_targets():
    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg(heads=HeadsConfig(audio="flow")))
    batch = make_batch([[2]], L=2 * 8, vocab=128, slots=[(Stream.USER, Kind.AUDIO, 5), (Stream.MODEL, Kind.TEXT, 3)],
                       empty_text=0.0)
    losses = compute_losses(model(batch), batch)
    assert losses["loss/audio"].item() == 0.0 and all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
