"""Floor decisions: a per-micro-turn reply hazard of 0.3 starts a reply after a geometric number of micro-turns when the
decision is sampled, never when it is greedy; the dMel head's speak/silent split by hand; every SamplingConfig field
reaches its head through the streaming session, fed live or (free generation) from an episode's tokens."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import turn_inputs
from tml.eval.generate import generate_model_side
from tml.eval.session import SessionConfig, StreamingSession
from tml.model import InteractionModel, ModelConfig, MoEConfig
from tml.model.config import FlowHeadConfig
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


# -- every field reaches its head through the one micro-turn engine -----------------------------------------------------

N_TURNS = 2


def drive_both(model, setup, cfg: SamplingConfig, turns: int = N_TURNS):
    """(live text, live bins, generated text, generated bins) for the first N_TURNS micro-turns, unforced: the session
    fed each micro-turn as a live stream delivers it (user dMel bins, the video frame, background text through its
    queue), and free generation (the same session fed the episode's training positions)."""
    _, layout, dmel, text, episode, tok = setup
    session = StreamingSession(model, layout, dmel, SessionConfig(sampling=cfg), text.pad_id)
    outs = [session.step(turn_inputs(tok, layout, episode, t)[0]) for t in range(turns)]
    short = tok.slice_turns(0, turns)
    g = generate_model_side(model, short, layout, dmel, cfg, text.pad_id)
    model_audio = ((short.stream == Stream.MODEL) & (short.kind == Kind.AUDIO))[short.kind == Kind.AUDIO]
    return (torch.tensor([o.text_ids for o in outs]), torch.cat([o.audio_bins for o in outs]),
            g.model_text, g.audio_bins[model_audio].reshape(-1, layout.cfg.n_mels))


def always_speaks(model: InteractionModel) -> InteractionModel:
    """``model`` with its floor head set to P(speak) = 1 - 2e-9 every micro-turn, so the content heads write."""
    with torch.no_grad():
        model.floor_head.proj.weight.zero_()
        model.floor_head.proj.bias.fill_(20.0)
    return model


@pytest.fixture(scope="module")
def speaking_model(setup):  # noqa: F811
    return always_speaks(copy.deepcopy(setup[0]))


@pytest.fixture(scope="module")
def hesitant_model(setup):  # noqa: F811
    """The setup's model with its floor head at P(speak) = 0.3 every micro-turn."""
    model = copy.deepcopy(setup[0])
    with torch.no_grad():
        model.floor_head.proj.weight.zero_()
        model.floor_head.proj.bias.fill_(math.log(0.3 / 0.7))
    return model


@pytest.fixture(scope="module")
def slot_floor_model(setup):  # noqa: F811
    """The setup's model without a floor head: every output slot takes its own speak/silent decision."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=setup[3].vocab_size,
                      moe=MoEConfig(hidden_dim=64, num_experts=4, top_k=2))
    cfg.heads.floor = False
    return InteractionModel(cfg).eval()


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
    return always_speaks(model)


BASE = dict(text_temperature=1.0, audio_temperature=1.0)
DMEL_FIELDS = [("floor", "greedy"), ("floor", "none"), ("text_temperature", 0.0), ("text_top_p", 0.01),
               ("audio_temperature", 0.0), ("audio_top_p", 0.01), ("seed", 1)]
FLOW_FIELDS = [("flow_steps", 2), ("flow_solver", "euler"), ("guidance", 2.0), ("flow_temperature", 0.3),
               ("text_temperature", 0.0), ("floor", "none"), ("seed", 1)]
# At P(speak) = 0.3 a sampled floor speaks in some of the 12 micro-turns (all silent: 1.4%, and the seed is fixed);
# a cold floor temperature (P -> 0) and the greedy rule never do.
# A cold temperature while speaking (P -> 0) or a threshold of 0.99 (P(go on) 0.004) ends every turn after one
# micro-turn, where the base goes on in ~30%.
FLOOR_FIELDS = [("floor_temperature", 0.05), ("floor_temperature_speaking", 0.05), ("floor_threshold_speaking", 0.99),
                ("floor", "greedy"), ("seed", 1)]


@pytest.mark.parametrize("head", ["dmel", "dmel_slot_floor", "flow", "floor"])
def test_every_sampling_field_reaches_its_head_live_and_in_free_generation(setup, speaking_model, slot_floor_model,
                                                                         flow_model, hesitant_model, head):  # noqa: F811
    """Free generation is the session fed an episode's positions instead of a live stream's inputs: the two must
    write the same, a seeded run must reproduce itself, and changing any one field must change what they write.
    (Before free generation drove the session, its own loop wrote bitwise these outputs for every case here.)"""
    model = {"dmel": speaking_model, "dmel_slot_floor": slot_floor_model, "flow": flow_model,
             "floor": hesitant_model}[head]
    fields = {"dmel": DMEL_FIELDS[2:], "dmel_slot_floor": DMEL_FIELDS, "flow": FLOW_FIELDS, "floor": FLOOR_FIELDS}[head]
    turns = setup[5].num_turns if head == "floor" else N_TURNS
    base = drive_both(model, setup, SamplingConfig(**BASE), turns)
    again = drive_both(model, setup, SamplingConfig(**BASE), turns)
    assert all(torch.equal(x, y) for x, y in zip(base, again)), "a seeded run does not reproduce itself"
    for key, value in [(None, None)] + fields:
        cfg = SamplingConfig(**{**BASE, **({key: value} if key else {})})
        s_text, s_bins, g_text, g_bins = drive_both(model, setup, cfg, turns) if key else base
        assert torch.equal(s_text, g_text) and torch.equal(s_bins, g_bins), key
        if key is not None:
            changed = {"text": not torch.equal(s_text, base[0]), "audio": not torch.equal(s_bins, base[1])}
            expect = "text" if key.startswith("text") else "audio" if key.startswith(("audio", "flow", "guid")) \
                else None
            assert changed[expect] if expect else any(changed.values()), (key, changed)


# -- the floor head: one decision per micro-turn ---------------------------------------------------------------------

def test_floor_targets_by_hand():
    """Micro-turn = [user audio][model text][model audio x3]. Row 0 packs a 5-micro-turn and a 1-micro-turn document,
    row 1 one micro-turn cut after its text slot by the row's end. The query is the user audio position of each
    micro-turn (followed by the first model slot); the target is 1 where at least 2 of the 3 model audio positions
    are not silent, or where speech starts (some speech, none in the document's previous micro-turn)."""
    from conftest import make_batch
    from tml.model.heads import floor_targets

    slots = [(Stream.USER, Kind.AUDIO, 1), (Stream.MODEL, Kind.TEXT, 1), (Stream.MODEL, Kind.AUDIO, 3)]
    batch = make_batch([[5, 1], [1]], L=30, vocab=10, empty_text=0.0, slots=slots)
    # row 0's micro-turns in order: which audio positions speak, and the expected target
    spoken = [[0, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]]
    want = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]  # starts; half; trails off; silent; starts again; a new document starts
    # Row 1 is cut: keep its first 2 positions (user audio, model text) and make the rest padding.
    for f in ("kind", "stream", "micro_turn", "position_ids", "text_ids", "target_kind"):
        getattr(batch, f)[1, 2:] = 0
    batch.doc_ids[1, 2:] = -1
    batch.target_kind[1, 1] = Kind.PAD
    audio_rows = (batch.kind.flatten() == Kind.AUDIO).nonzero().flatten().tolist()  # positions, row-major
    bins = torch.zeros(len(audio_rows), 4, 80, dtype=torch.long)
    model_audio = [p for p in audio_rows if batch.stream.flatten()[p] == Stream.MODEL and p < 30]
    for i, p in enumerate(model_audio):
        bins[audio_rows.index(p), 0, 0] = spoken[i // 3][i % 3] * 5  # one loud bin is enough to not be silent
    batch.audio_bins = bins
    is_audio_target = batch.target_kind == Kind.AUDIO
    row_of = ((batch.kind == Kind.AUDIO).flatten().cumsum(0) - 1).view(batch.shape)
    batch.target_audio = bins[row_of[:, 1:][is_audio_target[:, :-1]]]

    query, target = floor_targets(batch)
    assert query.nonzero().tolist() == [[0, 0], [0, 5], [0, 10], [0, 15], [0, 20], [0, 25]]  # row 1's: dropped
    assert target.tolist() == want


def test_floor_loss_is_the_binary_cross_entropy_of_the_decision():
    from conftest import make_batch, tiny_cfg
    from tml.model import compute_losses
    from tml.model.heads import floor_targets

    torch.manual_seed(0)
    model = InteractionModel(tiny_cfg())
    with torch.no_grad():
        model.floor_head.proj.weight.zero_()
        model.floor_head.proj.bias.fill_(0.4)
    batch = make_batch([[3, 2], [4]], L=5 * 20, vocab=128)
    y = floor_targets(batch)[1]
    p = 1 / (1 + math.exp(-0.4))
    by_hand = -(y * math.log(p) + (1 - y) * math.log(1 - p)).mean().item()
    losses = compute_losses(model(batch), batch, floor_weight=0.5)
    assert len(y) == 9 and losses["loss/floor"].item() == pytest.approx(by_hand, rel=1e-6)
    torch.testing.assert_close(losses["loss"], losses["loss/text"] + losses["loss/audio"] + losses["loss/aux"]
                               + 0.5 * losses["loss/floor"])


def test_a_floor_hazard_of_0_3_per_micro_turn_starts_after_a_geometric_wait():
    """P(speak) 0.3 per micro-turn: the first speaking micro-turn is Geometric(0.3) when sampled, never when greedy."""
    from tml.model.heads import FloorHead

    head = FloorHead(4)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.fill_(math.log(0.3 / 0.7))
    h, runs = torch.zeros(1, 4), 2000

    def wait(cfg, seed, limit):
        gen = torch.Generator().manual_seed(seed)
        return next((t for t in range(1, limit + 1) if bool(head.sample(h, cfg, gen)[0][0])), None)

    waits = [wait(SamplingConfig(), s, 200) for s in range(runs)]
    assert abs(sum(waits) / runs - 1 / 0.3) <= 4 * math.sqrt(0.7) / 0.3 / math.sqrt(runs)
    # floor_temperature 0.5 squares the odds: 0.3^2 / (0.3^2 + 0.7^2) = 0.155 per micro-turn
    q = 0.09 / 0.58
    waits = [wait(SamplingConfig(floor_temperature=0.5), s, 400) for s in range(runs)]
    assert abs(sum(waits) / runs - 1 / q) <= 4 * math.sqrt(1 - q) / q / math.sqrt(runs)
    assert all(wait(SamplingConfig(floor="greedy"), s, 50) is None for s in range(20))


def test_starting_and_stopping_take_their_own_floor_temperatures_and_threshold():
    """P(speak) 0.7 per micro-turn, floor_temperature 1 (start) and floor_temperature_speaking 0.5 (go on / stop):
    from silence the first speaking micro-turn is Geometric(0.7); once speaking, P(go on) = 0.7^2 / (0.7^2 + 0.3^2)
    = 0.845, so the turn stops after Geometric(0.155) micro-turns. The walk carries its previous decision as the
    streaming session does."""
    from tml.model.heads import FloorHead

    head = FloorHead(4)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.fill_(math.log(0.7 / 0.3))
    h, runs = torch.zeros(1, 4), 2000
    cfg = SamplingConfig(floor_temperature=1.0, floor_temperature_speaking=0.5)

    def walk(seed: int) -> tuple[int, int]:
        """(micro-turns until the first speaking one, speaking micro-turns until the first silent one after it)"""
        gen, speaking, start = torch.Generator().manual_seed(seed), torch.tensor([False]), None
        for t in range(1, 1000):
            speak = head.sample(h, cfg, gen, speaking)[0]
            if start is None and bool(speak):
                start = t
            elif start is not None and not bool(speak):
                return start, t - start
            speaking = speak
        raise AssertionError("no turn ended within 1,000 micro-turns")

    starts, lengths = zip(*(walk(s) for s in range(runs)))
    for waits, p in ((starts, 0.7), (lengths, 1 - 0.49 / 0.58)):
        assert abs(sum(waits) / runs - 1 / p) <= 4 * math.sqrt(1 - p) / p / math.sqrt(runs), (p, sum(waits) / runs)
    # without the speaking temperature both are the model's own 0.7: turns last Geometric(0.3)
    cfg = SamplingConfig(floor_temperature=1.0)
    lengths = [walk(s)[1] for s in range(runs)]
    assert abs(sum(lengths) / runs - 1 / 0.3) <= 4 * math.sqrt(0.7) / 0.3 / math.sqrt(runs)
    # a threshold of 0.8 while speaking: P(go on) = odds 7/3 against 8/2 -> (7/3) / (7/3 + 4) = 0.368, so turns stop
    # after Geometric(0.632) micro-turns; the start stays Geometric(0.7)
    cfg = SamplingConfig(floor_temperature=1.0, floor_threshold_speaking=0.8)
    starts, lengths = zip(*(walk(s) for s in range(runs)))
    p_stop = 1 - (7 / 3) / (7 / 3 + 4)
    for waits, p in ((starts, 0.7), (lengths, p_stop)):
        assert abs(sum(waits) / runs - 1 / p) <= 4 * math.sqrt(1 - p) / p / math.sqrt(runs), (p, sum(waits) / runs)


@pytest.mark.parametrize("bias", [20.0, -20.0])
def test_floor_head_decides_every_slot_of_its_micro_turn(setup, bias):  # noqa: F811
    """Silent: every text slot is <pad> and every audio position silent; speaking: no audio position is silent and
    the content heads write as they would (text temperature 1: words, as the untrained text head prefers them)."""
    _, layout, dmel, text, episode, tok = setup
    model = copy.deepcopy(setup[0])
    with torch.no_grad():
        model.floor_head.proj.weight.zero_()
        model.floor_head.proj.bias.fill_(bias)
    session = StreamingSession(model, layout, dmel, SessionConfig(sampling=SamplingConfig(text_temperature=1.0)),
                               text.pad_id)
    outs = [session.step(turn_inputs(tok, layout, episode, t)[0]) for t in range(3)]
    audio = torch.stack([o.audio_bins.view(-1, 4, 80) for o in outs])  # [turns, positions, S, C]
    silent = (audio == SILENT_BIN).flatten(2).all(-1)
    if bias > 0:
        assert all(o.speaks and o.p_speak > 0.99 for o in outs) and not silent.any()
        assert any(t != text.pad_id for o in outs for t in o.text_ids)
    else:
        assert not any(o.speaks for o in outs) and silent.all()
        assert all(t == text.pad_id for o in outs for t in o.text_ids)


def test_a_speaking_slot_writes_a_word_with_its_probability_given_speech():
    """The text head gives P(pad) 0.8, P(word) 0.2 (words 0.15 / 0.05); the floor head P(speak) 0.4 and a decision
    to speak. A word implies speech, so given that decision a slot writes with P(word | speak) = 0.2 / 0.4 = 0.5, and
    the word is the likelier one (greedy). ``words_given_speech``: ``always`` writes with 0.5 in every speaking row,
    ``never`` with the head's 0.2, ``start`` with 0.5 in the rows whose micro-turn starts a turn and 0.2 in the rows
    that go on speaking (without a history, every speaking row). Where the decision is silence it never writes;
    P(word) above P(speak) writes always."""

    head = TextHead(dim=4, vocab_size=3)
    n = 20000
    logits = torch.tensor([0.8, 0.15, 0.05]).log().expand(n, 3)
    speak, p_speak = torch.ones(n, dtype=torch.bool), torch.full((n,), 0.4)
    starts = torch.arange(n) % 2 == 0
    h = torch.zeros(n, 4)
    for given, rows_start, want_start, want_on in (("always", starts, 0.5, 0.5), ("never", starts, 0.2, 0.2),
                                                   ("start", starts, 0.5, 0.2), ("start", None, 0.5, 0.5)):
        cfg = SamplingConfig(words_given_speech=given)
        tok = head.sample(h, cfg, torch.Generator().manual_seed(0), 0, logits, speak, p_speak, rows_start)
        assert set(tok.unique().tolist()) == {0, 1}
        for rows, want in ((starts, want_start), (~starts, want_on)):  # binomial sd 0.005 over 10,000 rows
            assert (tok[rows] == 1).float().mean().item() == pytest.approx(want, abs=0.02), (given, want)
    given = SamplingConfig(words_given_speech="always")
    tok = head.sample(h, given, torch.Generator().manual_seed(0), 0, logits, ~speak, p_speak)
    assert (tok == 0).all()
    tok = head.sample(h, given, torch.Generator().manual_seed(0), 0, logits, speak, torch.full((n,), 0.1))
    assert (tok == 1).all()
    with pytest.raises(ValueError, match="words_given_speech='sometimes'"):
        SamplingConfig(words_given_speech="sometimes").validate()
    with pytest.raises(ValueError, match="floor_threshold_speaking=1"):
        SamplingConfig(floor_threshold_speaking=1).validate()


def test_session_tells_the_text_head_which_micro_turns_start_a_turn(setup):  # noqa: F811
    """P(speak) 0.5 every micro-turn: the decisions make a random walk of turns. The text head must get
    ``starts`` = speaks now and was silent in the session's previous micro-turn (``words_given_speech="start"``),
    in every text slot of the micro-turn, for each of two batched sessions on its own walk."""
    _, layout, dmel, text, episode, tok = setup
    model = copy.deepcopy(setup[0])
    with torch.no_grad():
        model.floor_head.proj.weight.zero_()
        model.floor_head.proj.bias.zero_()
    seen, write = [], model.text_head.write

    def spy(*args, **kwargs):  # the real head's draw, with what the session passed it recorded
        seen.append(args[6] if len(args) > 6 else kwargs.get("starts"))
        return write(*args, **kwargs)

    model.text_head.write = spy
    session = StreamingSession(model, layout, dmel, SessionConfig(), text.pad_id, sessions=2)
    previous, n_starts = torch.zeros(2, dtype=torch.bool), 0
    for t in range(24):
        seen.clear()
        inputs = turn_inputs(tok, layout, episode, t % 3)[0]
        outs = session.step_many([inputs, inputs])
        speaks = torch.tensor([o.speaks for o in outs])
        assert seen and all(torch.equal(s, speaks & ~previous) for s in seen), (t, seen, speaks, previous)
        n_starts += int((speaks & ~previous).sum())
        previous = speaks
    assert n_starts >= 3  # the walk starts turns (expected ~12 in 48 micro-turns)
