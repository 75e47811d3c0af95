"""Evaluation labels derived from both speakers' word alignments, so duplex evaluation works on recorded corpora."""

import logging

import pytest

from conftest import conversation
from data_prep.ingest_conversations import ingest
from tml.audio.dmel import DMelTokenizer
from tml.audio.wav import write_wav
from tml.eval.evaluate import SilenceRuleResponder, evaluate, labels_from_events
from tml.eval.loading import read_episodes
from tml.eval.vad import VADConfig
from tml.eval.word_events import events_from_words
from tml.streams import LayoutConfig, MicroTurnLayout, Word
from tml.text.tokenizer import TextTokenizer


def test_turn_ends_barge_ins_and_backchannels_by_hand():
    words = {
        "model": [Word("hello", 0.2, 0.5), Word("there", 0.6, 0.9),  # 0.2-0.9
                  Word("well", 3.0, 3.4),  # answers the user's turn that ended at 2.5
                  Word("a", 4.0, 4.3), Word("long", 4.4, 5.0)],  # 4.0-5.0, yields to the user who barged in at 4.5
        "user": [Word("mhm", 0.5, 0.7),  # 0.2 s inside the model's utterance: a backchannel, the model goes on
                 Word("so", 1.5, 1.8), Word("what", 1.9, 2.2), Word("about", 2.3, 2.5),  # a turn, 1.5-2.5
                 Word("wait", 4.5, 5.0), Word("please", 5.1, 6.0)],  # a 1.5 s turn that starts inside 4.0-5.0
    }
    events = events_from_words(words)
    kinds = [(e["speaker"], e["time"], e["kind"]) for e in events if e["type"] == "utterance_start"]
    assert kinds == [("model", 0.2, "turn"), ("user", 0.5, "backchannel"), ("user", 1.5, "turn"),
                     ("model", 3.0, "turn"), ("model", 4.0, "turn"), ("user", 4.5, "turn")]
    labels = labels_from_events(events, 7.0)
    assert labels.response_turns == [(1.5, 2.5)]  # the 4.5-6.0 turn gets no model reply: not expected
    assert labels.interruptions == [4.5]
    # the "mhm" comes 0.4 s before the model's line ends (0.9): it would stop there anyway, so no test of going on
    assert labels.false_barge_ins == [] and labels.sounds_at_line_end == [0.5]
    assert [e["stop_by"] for e in events if e["type"] == "interruption"] == [5.0]


def test_a_short_answer_after_the_other_speaker_is_a_turn_not_a_backchannel():
    events = events_from_words({"model": [Word("ready?", 0.0, 0.5)], "user": [Word("yes", 1.0, 1.3)]})
    assert [e["kind"] for e in events if e["type"] == "utterance_start"] == ["turn", "turn"]


def test_evaluate_on_an_ingested_corpus_measures_turn_taking_and_warns_on_the_rest(tmp_path, voices, caplog):  # noqa: F811
    root = tmp_path / "corpus"
    root.mkdir()
    x, al = conversation(voices)  # left says a sentence at 0.2 s, right answers at 1.6 s
    write_wav(root / "c1.wav", x, 24000)
    (root / "c1.json").write_text(__import__("json").dumps({"alignments": al}))
    (root / "train.jsonl").write_text('{"path": "c1.wav", "duration": 3.0}\n')
    out = tmp_path / "data"
    ingest("moshi", root / "train.jsonl", out, model_speaker="other", vocab_size=300, log=lambda s: None)
    (ep,) = read_episodes(out)
    assert ep.meta["events_source"] == "words"
    user_end = max(w.end for w in ep.words["user"])
    assert [(e["time"], e["by"]) for e in ep.meta["events"] if e["type"] == "expected_response"] == \
        [(pytest.approx(user_end), pytest.approx(min(w.start for w in ep.words["model"])))]
    layout, dmel = MicroTurnLayout(LayoutConfig()), DMelTokenizer()
    text = TextTokenizer.load(out / "tokenizer.json")
    with caplog.at_level(logging.WARNING):
        result = evaluate(lambda: SilenceRuleResponder(layout, dmel, gap_s=0.3, speak_s=1.0), [ep], layout, dmel,
                          text, tmp_path / "eval", VADConfig(method="logmel"))
    metrics = result["metrics"]
    assert metrics["turn_taking_latency_mean_s"] is not None and metrics["counts"]["latency"] == 1
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "interruption_stop_rate" in warned and "nothing to measure in 1 episodes" in warned
    assert "turn_taking" not in warned
