"""Floor decisions: a per-micro-turn reply hazard of 0.3 starts a reply after a geometric number of micro-turns when the
decision is sampled, never when it is greedy; the dMel head's speak/silent split by hand; every SamplingConfig field
reaches its head through both the streaming session and free generation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import turn_inputs
from tml.eval.session import SessionConfig, StreamingSession
from tml.model import InteractionModel, ModelConfig, MoEConfig
from tml.model.config import FlowHeadConfig
from tml.model.generate import generate_model_side
from tml.model.heads import SILENT_BIN, DMelHead, TextHead, bins_to_unit, unit_to_bins
from tml.model.sampling import SamplingConfig
from tml.streams import Kind, Stream

PAD = 0


def hazard_head(hazard: float, vocab: int = 501) -> tuple[TextHead, torch.Tensor]:
    """A text head whose P(not pad) is ``hazard`` at hidden state h, spread evenly over vocab - 1 words, so no single
    word is ever more likely than pad: the shape a trained model's reply onset has."""
    head = TextHead(4, vocab)
    p = torch.full((vocab,), hazard / (vocab - 1))
    p[PAD] = 1 - hazard
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.weight[:, 0] = p.log()
    return head, torch.tensor([[1.0, 0.0, 0.0, 0.0]])


def first_reply(head, h, cfg: SamplingConfig, seed: int, limit: int) -> int | None:
    """Micro-turns (1-based) until the head writes a word, one decision per micro-turn; None if not within limit."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, limit + 1):
        if int(head.sample(h, cfg, gen, pad_id=PAD)[0]) != PAD:
            return t
    return None


def test_hazard_of_0_3_starts_a_reply_after_a_geometric_wait_and_greedy_never_does():
    hazard, runs = 0.3, 2000
    head, h = hazard_head(hazard)
    waits = [first_reply(head, h, SamplingConfig(), seed, limit=200) for seed in range(runs)]
    assert None not in waits
    # Geometric(p): mean 1/p, variance (1 - p) / p^2; the mean of n runs is within 4 standard errors of 1/p
    # (two-sided chance of a false failure ~6e-5).
    mean, sd = 1 / hazard, math.sqrt(1 - hazard) / hazard
    assert abs(sum(waits) / runs - mean) <= 4 * sd / math.sqrt(runs), sum(waits) / runs
    # P(wait = 1) = p: the first micro-turn already starts a reply in ~30% of the runs
    assert abs(waits.count(1) / runs - hazard) <= 4 * math.sqrt(hazard * (1 - hazard) / runs)
    # Greedy floor (P(speak) = 0.3 < 0.5) and the plain argmax over tokens (pad 0.7 beats every word) never speak.
    for cfg in (SamplingConfig(floor="greedy"), SamplingConfig(floor="none", text_temperature=0.0)):
        assert all(first_reply(head, h, cfg, seed, limit=50) is None for seed in range(20))


def test_greedy_floor_speaks_once_speech_is_likelier_than_silence():
    head, h = hazard_head(0.6)
    assert first_reply(head, h, SamplingConfig(floor="greedy"), 0, limit=1) == 1


def test_text_word_given_speech_is_chosen_among_non_pad_tokens():
    # P = [pad 0.5, w1 0.3, w2 0.2]: given speech the word is w1 greedily; sampled at T=1 it is w1 with 0.3/0.5 = 0.6
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(20000, -1)
    head = TextHead(3, 3)
    gen = torch.Generator().manual_seed(0)
    greedy = head.sample(torch.zeros(20000, 3), SamplingConfig(), gen, PAD, logits)
    spoke = greedy != PAD
    assert abs(spoke.float().mean().item() - 0.5) < 0.015 and greedy[spoke].eq(1).all()
    drawn = head.sample(torch.zeros(20000, 3), SamplingConfig(text_temperature=1.0), gen, PAD, logits)
    words = drawn[drawn != PAD]
    assert abs(words.eq(1).float().mean().item() - 0.6) < 0.02
    top = head.sample(torch.zeros(20000, 3), SamplingConfig(text_temperature=1.0, text_top_p=0.5), gen, PAD, logits)
    assert top[top != PAD].eq(1).all()  # nucleus 0.5 of {w1 0.6, w2 0.4} is w1 alone


def test_dmel_floor_one_decision_per_position_from_mean_non_silence():
    # 1 frame x 2 channels x 3 bins. Channel 0: P(silent bin) 0.6; channel 1: 0.2. P(speak) = 1 - mean = 0.6, so
    # 1 - P(speak) = 0.4 comes out of each silent bin: channel 0 keeps 0.2 there (over [0.2, 0.3, 0.1]: bin 1
    # greedy), channel 1 keeps none ([0, 0.1, 0.7]: bin 2).
    head = DMelHead(4, 1, 2, 3)
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]])
    logits = p.log().expand(20000, 1, 2, 3)
    gen = torch.Generator().manual_seed(1)
    bins = unit_to_bins(head.sample(torch.zeros(20000, 4), SamplingConfig(), gen, logits), 3)
    silent = bins.eq(SILENT_BIN).all(-1).all(-1)
    assert abs(silent.float().mean().item() - 0.4) < 0.015  # one draw per position, not one per channel
    assert bins[~silent].eq(torch.tensor([[1, 2]])).all()
    # given speech, sampled at T=1: channel 0 is silent with 0.2 / 0.6, channel 1 never
    drawn = unit_to_bins(head.sample(torch.zeros(20000, 4), SamplingConfig(audio_temperature=1.0), gen, logits), 3)
    speaking = drawn[~drawn.eq(SILENT_BIN).all(-1).all(-1)]
    assert abs(speaking[:, 0, 0].eq(0).float().mean().item() - 1 / 3) < 0.02
    assert speaking[:, 0, 1].ne(0).all()
    # the greedy floor speaks at P(speak) 0.6 > 0.5; "none" is the per-channel argmax (channel 0 silent)
    assert unit_to_bins(head.sample(torch.zeros(1, 4), SamplingConfig(floor="greedy"), gen, logits[:1]), 3).tolist() \
        == [[[1, 2]]]
    assert torch.equal(head.sample(torch.zeros(1, 4), SamplingConfig(floor="none"), gen, logits[:1]),
                       bins_to_unit(torch.tensor([[[0, 2]]]), 3))


# -- every field reaches its head through both drivers --------------------------------------------------------------

N_TURNS = 2


def drive_both(model, setup, cfg: SamplingConfig):
    """(session text, session bins, generate text, generate bins) for the first N_TURNS micro-turns, unforced."""
    _, layout, dmel, text, episode, tok = setup
    session = StreamingSession(model, layout, dmel, SessionConfig(sampling=cfg), text.pad_id)
    outs = [session.step(turn_inputs(tok, layout, episode, t)[0]) for t in range(N_TURNS)]
    short = tok.slice_turns(0, N_TURNS)
    g = generate_model_side(model, short, cfg, text.pad_id)
    model_audio = ((short.stream == Stream.MODEL) & (short.kind == Kind.AUDIO))[short.kind == Kind.AUDIO]
    return (torch.tensor([o.text_ids for o in outs]), torch.cat([o.audio_bins for o in outs]),
            g.model_text, g.audio_bins[model_audio].reshape(-1, layout.cfg.n_mels))


@pytest.fixture(scope="module")
def flow_model(setup):  # noqa: F811
    text = setup[3]
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=text.vocab_size,
                      moe=MoEConfig(hidden_dim=64, num_experts=4, top_k=2))
    cfg.heads.audio, cfg.heads.flow = "flow", FlowHeadConfig(hidden_dim=32, n_layers=1, cond_dropout=0.1)
    model = InteractionModel(cfg).eval()
    for m in model.audio_head.modules():  # adaLN-zero starts at velocity 0: give the flow something to integrate
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    return model


BASE = dict(text_temperature=1.0, audio_temperature=1.0)
DMEL_FIELDS = [("floor", "greedy"), ("floor", "none"), ("text_temperature", 0.0), ("text_top_p", 0.01),
               ("audio_temperature", 0.0), ("audio_top_p", 0.01), ("seed", 1)]
FLOW_FIELDS = [("flow_steps", 2), ("flow_solver", "euler"), ("guidance", 2.0), ("flow_temperature", 0.3),
               ("text_temperature", 0.0), ("seed", 1)]


@pytest.mark.parametrize("head", ["dmel", "flow"])
def test_every_sampling_field_reaches_its_head_in_session_and_generation(setup, flow_model, head):  # noqa: F811
    """The session and free generation draw through the same head methods in the same order from a generator seeded
    alike, so they must write the same; and changing any one field must change what they write."""
    model = setup[0] if head == "dmel" else flow_model
    fields = DMEL_FIELDS if head == "dmel" else FLOW_FIELDS
    base = drive_both(model, setup, SamplingConfig(**BASE))
    for key, value in [(None, None)] + fields:
        cfg = SamplingConfig(**{**BASE, **({key: value} if key else {})})
        s_text, s_bins, g_text, g_bins = drive_both(model, setup, cfg) if key else base
        assert torch.equal(s_text, g_text), key
        differ = (s_bins != g_bins).float().mean().item()  # flow units may sit on a bin edge: allow a rare flip
        assert differ <= (1e-3 if head == "flow" else 0.0), (key, differ)
        if key is not None:
            changed = {"text": not torch.equal(s_text, base[0]), "audio": not torch.equal(s_bins, base[1])}
            expect = "text" if key.startswith("text") else "audio" if key.startswith(("audio", "flow", "guid")) \
                else None
            assert changed[expect] if expect else any(changed.values()), (key, changed)
