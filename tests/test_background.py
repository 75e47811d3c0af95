"""The background model: reference tools by hand, non-blocking delivery, and results placed in the micro-turn in
which they arrive when a session delegates."""

import time

import pytest
import torch

from tml.audio.dmel import DMelTokenizer
from tml.eval.background import DelegationBridge, ToolBackground, calculator, lookup
from tml.eval.session import MicroTurnInputs, StreamingSession
from tml.model import InteractionModel, ModelConfig, MoEConfig
from tml.streams import LayoutConfig, MicroTurnLayout
from tml.text.tokenizer import train_bpe


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    corpus = "result: 84 12 times 7 what is the capital of France Paris let me check".split()
    return train_bpe([" ".join(corpus)] * 20, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_calculator_and_lookup_by_hand():
    assert calculator("12 times 7") == "result: 84"
    assert calculator("what is 3 + 4 * 2") == "result: 11"
    assert calculator("2 to the power of 10") == "result: 1024"
    assert calculator("7 divided by 2") == "result: 3.5"
    with pytest.raises(ValueError):
        calculator("__import__('os')")
    assert lookup({"France": "Paris"})("capital of france?") == "result: Paris"


def test_results_never_block_and_wait_for_their_delay(text):
    def slow(q):
        time.sleep(0.3)
        return calculator(q)

    bg = ToolBackground(slow, delay_s=0.4)
    bridge = DelegationBridge(bg, text)
    span = [text.delegate_id, *text.encode("12 times 7"), text.end_delegate_id]
    bridge.observe(span, now=1.0)
    assert bridge.submitted == ["12 times 7"]
    t0 = time.perf_counter()
    assert bridge.arrivals(now=5.0) == []  # the thread is still working: nothing, and no waiting
    assert time.perf_counter() - t0 < 0.05
    time.sleep(0.5)
    assert bridge.arrivals(now=1.3) == []  # done, but not due before 1.0 + 0.4 s of session time
    want = [i for w in "result: 84".split() for i in text.word_ids(w)]
    assert bridge.arrivals(now=1.4) == want
    assert bridge.arrivals(now=9.0) == []  # delivered once
    bg.close()


def test_session_delegates_and_reads_the_answer_in_its_arrival_turn(text):
    torch.manual_seed(0)
    layout = MicroTurnLayout(LayoutConfig())
    model = InteractionModel(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=text.vocab_size,
                                         moe=MoEConfig(hidden_dim=64, num_experts=4)))
    bg = ToolBackground(calculator, delay_s=0.6)
    session = StreamingSession(model, layout, DMelTokenizer(), background=DelegationBridge(bg, text))
    span = [text.delegate_id, *text.encode("12 times 7"), text.end_delegate_id]
    span += [text.pad_id] * (-len(span) % 4)
    forced = [span[i : i + 4] for i in range(0, len(span), 4)]  # the span, written over micro-turns 1, 2, ...
    silence = torch.zeros(20, 80, dtype=torch.long)
    closes = len(forced)  # the span closes at the end of micro-turn `closes` (session time 0.2 * (closes + 1))
    seen = {}
    for t in range(closes + 6):
        force = {"text": forced[t - 1] if 1 <= t <= len(forced) else [text.pad_id] * 4, "audio": silence}
        out = session.step(MicroTurnInputs(user_audio=silence), force=force)
        seen[t] = out.background_ids
        time.sleep(0.01)  # the worker thread gets the core
    # Submitted at 0.2 * (closes + 1) s, due 0.6 s later = 3 micro-turns after the one that wrote the closing tag.
    arrival = closes + 1 + 3
    want = [i for w in "result: 84".split() for i in text.word_ids(w)]
    assert all(ids == [text.pad_id] * 2 for t, ids in seen.items() if t < arrival)
    got = [i for t in range(arrival, closes + 6) for i in seen[t] if i != text.pad_id]
    assert seen[arrival][0] == want[0] and got == want
    bg.close()


def test_synthetic_delegation_reaches_the_tool_through_the_model_text(text):
    """A generated delegation episode, interleaved: the model's text stream carries ``<delegate> a * b </delegate>``
    from the micro-turn in which its "let me check" ends; the bridge, reading that stream micro-turn by micro-turn,
    submits exactly the query, and the calculator answers what the generator put on the background stream."""
    from data_prep.synth_dialogues import SynthConfig, make_episode
    from tml.streams import Stream
    from tml.streams.interleave import interleave
    from tml.streams.modalities import Kind

    for seed in range(1, 40):  # the first seed whose delegation is a multiplication (the calculator's kind)
        ep = make_episode(0, SynthConfig(seed=seed, background_prob=1.0, backchannel_prob=0.0))
        (event,) = [e for e in ep.meta["events"] if e["type"] == "delegate"]
        if "*" in event["query"]:
            break
    layout = MicroTurnLayout(LayoutConfig())
    tok = interleave(ep, layout, DMelTokenizer(), text)
    model_text = tok.text_ids[(tok.stream == Stream.MODEL) & (tok.kind == Kind.TEXT)].view(tok.num_turns, -1)
    first = int(torch.nonzero(model_text == text.delegate_id)[0, 0])
    # Placed at its time (one micro-turn ahead: the model's streams lead by model_lead_turns), or later if the
    # slots were full.
    assert first >= int(event["time"] / 0.2 + 1e-9) - layout.cfg.model_lead_turns
    assert int((model_text == text.delegate_id).sum()) == int((model_text == text.end_delegate_id).sum()) == 1

    bridge = DelegationBridge(ToolBackground(calculator, delay_s=0.0), text)
    for t in range(tok.num_turns):
        bridge.observe(model_text[t].tolist(), now=0.2 * t)
    assert bridge.submitted == [event["query"]]
    deadline = time.time() + 10
    while not (ids := bridge.arrivals(now=1e9)) and time.time() < deadline:
        time.sleep(0.01)
    assert text.decode(ids) == ep.background[0].text  # "result: a*b", as the generator wrote it
