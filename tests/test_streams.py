"""The batch contract: layout, interleaving and packing checked against hand-computed positions."""

import math
from dataclasses import replace

import pytest
import torch

from conftest import make_batch
from tml.audio.dmel import DMelTokenizer
from tml.errors import ConfigError
from tml.streams import IGNORE_INDEX, BackgroundEvent, BatchError, Episode, Kind, LayoutConfig, MicroTurnLayout
from tml.streams import SlotConfig, Stream, Word
from tml.streams.interleave import interleave
from tml.streams.modalities.text import place_text
from tml.streams.pack import collate, pack_rows
from tml.text.tokenizer import train_bpe

SR = 16000
# Default layout, one micro-turn: [user audio 0-4][video 5-8][background text 9-10][model text 11-14][model audio 15-19]
U_AUDIO, VIDEO, BG, M_TEXT, M_AUDIO, TURN = 0, 5, 9, 11, 15, 20


@pytest.fixture(scope="module")
def layout():
    return MicroTurnLayout(LayoutConfig())


@pytest.fixture(scope="module")
def dmel():
    return DMelTokenizer()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    words = "hello there how are you doing today fine thanks result forty two let me check".split()
    return train_bpe([" ".join(words)] * 20, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def make_episode(duration=1.2, burst=None, model_words=(), user_words=(), background=(), video_frames=None,
                 key="ep", sr=SR):
    n = int(duration * sr)
    user = torch.zeros(n)
    if burst is not None:  # a 1 kHz tone between burst[0] and burst[1] seconds
        a, b = int(burst[0] * sr), int(burst[1] * sr)
        user[a:b] = 0.5 * torch.sin(2 * math.pi * 1000 * torch.arange(b - a) / sr)
    return Episode(
        key=key, duration=duration, sample_rate=sr, audio={"user": user, "model": torch.zeros(n)},
        words={"user": [Word(*w) for w in user_words], "model": [Word(*w) for w in model_words]},
        video=video_frames, video_fps=5.0, background=[BackgroundEvent(*e) for e in background],
    )


def test_default_layout_positions(layout):
    assert layout.length == TURN
    assert layout.describe() == "[user audio x5][video patch x4][background text x2][model text x4][model audio x5]"
    assert layout.kinds[U_AUDIO:VIDEO] == [Kind.AUDIO] * 5 and layout.kinds[M_TEXT:M_AUDIO] == [Kind.TEXT] * 4
    assert layout.streams[M_AUDIO:] == [Stream.MODEL] * 5 and layout.streams[BG:M_TEXT] == [Stream.BACKGROUND] * 2
    assert layout.num_turns(1.2) == 6 and layout.num_turns(1.19) == 5 and layout.turn_of(0.399) == 1


@pytest.mark.parametrize("change, key", [
    (dict(micro_turn_ms=210), "micro_turn_ms"),
    (dict(frame_width=100), "frame_width"),
    (dict(slots=[SlotConfig("user", "audio", 4), SlotConfig("model", "text", 2)]), "slots[0].count"),
    (dict(slots=[SlotConfig("model", "text", 2), SlotConfig("user", "audio", 5)]), "input slot"),
    (dict(slots=[SlotConfig("user", "audio", 5)]), "no model"),
])
def test_impossible_layouts_name_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        MicroTurnLayout(LayoutConfig(**change))


def test_place_text_spills_overflow_by_hand():
    # Two slots per turn. Turn 0 gets a word of 3 tokens (one spills into turn 1), a word at 0.25 s lands in turn 1
    # behind the spill, a word at 0.61 s in turn 3; turn 2 stays empty.
    ids, dropped = place_text([(0.25, [7]), (0.05, [4, 5, 6]), (0.61, [8, 9, 10])], num_turns=4, slots=2,
                              turn_s=0.2, pad_id=0)
    assert ids.tolist() == [[4, 5], [6, 7], [0, 0], [8, 9]]
    assert dropped == 1  # token 10 did not fit before the end


@pytest.fixture(scope="module")
def same_turn():
    """The old alignment: the model's slots of micro-turn t hold its reference of micro-turn t."""
    return MicroTurnLayout(LayoutConfig(model_lead_turns=0))


@pytest.mark.parametrize("sr", [SR, 22050])
def test_interleave_places_audio_words_and_frames(same_turn, dmel, text, sr):
    layout = same_turn
    # Tone from 0.45 to 0.50 s: mel frames 44..51 (25 ms windows centred every 10 ms) = turn 2, audio slots 1 and 2.
    # A 22.05 kHz recording is resampled onto the same clock.
    frames = torch.stack([torch.full((80, 80, 3), 10 * i, dtype=torch.uint8) for i in range(6)])
    ep = make_episode(burst=(0.45, 0.50), model_words=[("hello", 0.21, 0.4), ("there", 0.9, 1.1)],
                      background=[(0.65, "result forty two")], video_frames=frames, sr=sr)
    tok = interleave(ep, layout, dmel, text)
    assert tok.num_turns == 6 and tok.kind.numel() == 6 * TURN
    # Audio: which user audio positions are not silence.
    silence = dmel.silence_bins(4)
    user_audio = tok.audio_bins.reshape(6, 2, 5, 4, 80)[:, 0]  # [turn, slot, 4, 80] (user stream first)
    loud = {(t, s) for t in range(6) for s in range(5) if not torch.equal(user_audio[t, s], silence)}
    assert loud == {(2, 1), (2, 2)}
    model_audio = tok.audio_bins.reshape(6, 2, 5, 4, 80)[:, 1]
    assert all(torch.equal(model_audio[t, s], silence) for t in range(6) for s in range(5))
    # Model words: "hello" starts at 0.21 s -> turn 1, first model text slot; "there" at 0.9 s -> turn 4.
    ids = tok.text_ids.reshape(6, TURN)
    hello, there = text.word_ids("hello"), text.word_ids("there")
    assert ids[1, M_TEXT : M_TEXT + len(hello)].tolist() == hello
    assert ids[4, M_TEXT : M_TEXT + len(there)].tolist() == there
    assert (ids[[0, 2, 3, 5], M_TEXT:M_AUDIO] == text.pad_id).all()
    # Background event at 0.65 s -> turn 3, two slots, the rest spills to turn 4.
    bg = [i for w in "result forty two".split() for i in text.word_ids(w)]
    assert ids[3, BG:M_TEXT].tolist() == bg[:2]
    assert ids[4, BG:M_TEXT].tolist() == (bg[2:4] + [0, 0])[:2]
    # Video: one 80x80 frame per turn -> 4 patches whose pixels equal 10 * frame index.
    assert (tok.kind.reshape(6, TURN)[:, VIDEO:BG] == Kind.PATCH).all()
    assert tok.patches.reshape(6, 4, -1)[:, :, 0].tolist() == [[10 * t] * 4 for t in range(6)]
    assert tok.patch_rc[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_model_streams_lead_by_one_micro_turn(layout, same_turn, dmel, text):
    # Default alignment (model_lead_turns=1): output slots of micro-turn t carry the model's reference of t + 1,
    # which is when the playback clock plays them. Model words "hello" at 0.21 s (turn 1) -> turn 0, "there" at
    # 0.9 s (turn 4) -> turn 3; a model tone from 0.45 to 0.50 s (frames 44..51: turn 2, slots 1-2) -> turn 1.
    # User streams and background text do not move.
    ep = make_episode(burst=(0.45, 0.50), model_words=[("hello", 0.21, 0.4), ("there", 0.9, 1.1)],
                      user_words=[("fine", 0.65, 0.8)], background=[(0.65, "result forty two")])
    ep.audio["model"], ep.words["user"] = ep.audio["user"].clone(), []
    assert layout.cfg.model_lead_turns == 1
    tok, old = interleave(ep, layout, dmel, text), interleave(ep, same_turn, dmel, text)
    silence = dmel.silence_bins(4)
    audio = tok.audio_bins.reshape(6, 2, 5, 4, 80)
    loud = {(s_, t, k) for s_ in range(2) for t in range(6) for k in range(5) if not torch.equal(audio[t, s_, k], silence)}
    assert loud == {(0, 2, 1), (0, 2, 2), (1, 1, 1), (1, 1, 2)}  # (stream 0 user / 1 model, turn, slot)
    old_audio = old.audio_bins.reshape(6, 2, 5, 4, 80)
    assert torch.equal(audio[:5, 1], old_audio[1:, 1]) and torch.equal(audio[:, 0], old_audio[:, 0])
    assert all(torch.equal(audio[5, 1, k], silence) for k in range(5))  # past the end: silence
    ids = tok.text_ids.reshape(6, TURN)
    hello, there = text.word_ids("hello"), text.word_ids("there")
    assert ids[0, M_TEXT : M_TEXT + len(hello)].tolist() == hello
    assert ids[3, M_TEXT : M_TEXT + len(there)].tolist() == there
    assert (ids[[1, 2, 4, 5], M_TEXT:M_AUDIO] == text.pad_id).all()
    assert torch.equal(ids[:, BG:M_TEXT], old.text_ids.reshape(6, TURN)[:, BG:M_TEXT])
    with pytest.raises(ConfigError, match="model_lead_turns"):
        MicroTurnLayout(LayoutConfig(model_lead_turns=-1))


def test_video_stride_leaves_empty_slots(dmel, text):
    lay = MicroTurnLayout(LayoutConfig(video_stride=2))
    frames = torch.zeros(6, 80, 80, 3, dtype=torch.uint8)
    tok = interleave(make_episode(video_frames=frames), lay, dmel, text)
    video_kinds = tok.kind.reshape(6, TURN)[:, VIDEO]
    assert video_kinds.tolist() == [Kind.PATCH, Kind.PAD] * 3
    assert tok.patches.shape[0] == 3 * 4


def test_pack_targets_and_document_mask(layout, dmel, text):
    a = interleave(make_episode(1.0, model_words=[("hello", 0.0, 0.2)], key="a"), layout, dmel, text)
    b = interleave(make_episode(0.6, model_words=[("fine", 0.2, 0.4)], key="b"), layout, dmel, text)
    rows = pack_rows(iter([((0,), a), ((1,), b), ((2,), b)]), seq_len=200, turn_length=TURN)
    pieces, cursor = next(rows)
    assert [p.key for p in pieces] == ["a", "b", "b"] and [p.num_turns for p in pieces] == [5, 3, 2]
    assert cursor.position == (2,) and cursor.turn_offset == 2  # the second "b" continues in the next row
    batch = collate([pieces], 200)
    assert batch.shape == (1, 200)
    assert batch.doc_ids[0, :100].eq(0).all() and batch.doc_ids[0, 100:160].eq(1).all()
    assert batch.position_ids[0, 100].item() == 0 and batch.micro_turn[0, 100 + TURN].item() == 1
    tk = batch.target_kind[0]
    # Within a turn: bg text slot 1 (10) predicts model text 0; model text 3 (14) predicts model audio 0;
    # model audio 4 (19) predicts nothing; input slots before 10 predict nothing.
    assert tk[:10].eq(Kind.PAD).all()
    assert tk[10:14].eq(Kind.TEXT).all() and tk[14:19].eq(Kind.AUDIO).all() and tk[19] == Kind.PAD
    assert batch.target_text[0, 10].item() == text.word_ids("hello")[0]
    assert tk[99] == Kind.PAD  # last position of document 0 predicts nothing across the boundary
    assert torch.equal(batch.target_audio[0], batch.audio_bins[5])  # position 15 = 6th audio position of the row
    assert int(batch.loss_mask.sum()) == 10 * 9
    m = batch.attention_mask()[0, 0]
    assert not m[100:, :100].any() and m[150, 100:151].all() and not m[150, 151:].any()
    assert not m[:100, 100:].any()


def test_heard_text_labels_user_audio_where_words_end(layout, dmel, text):
    # The user says "hello" (0.10-0.33 s) and "how are you" ending at 0.61 / 0.70 / 0.71 s. A word's tokens are due
    # from the 40 ms audio position its end falls in (position p covers [0.04 p, 0.04 (p + 1)) s), one token per
    # position, spilling on. In the test vocabulary "hello" is 3 tokens, "how" 2, "are" and "you" 1 each:
    # hello -> 8, 9, 10 (0.33 s); how -> 15, 16 (0.61 s); are -> 17 (0.70 s); you is due at 17 too -> 18.
    ep = make_episode(1.2, user_words=[("hello", 0.10, 0.33), ("how", 0.40, 0.61), ("are", 0.61, 0.70),
                                       ("you", 0.70, 0.71)], model_words=[("fine", 0.8, 1.0)])
    tok = interleave(ep, layout, dmel, text)
    ids = [i for w in ("hello", "how", "are", "you") for i in text.word_ids(w)]
    assert len(ids) == 7
    heard = tok.heard_text.reshape(6, TURN)
    want = torch.full((30,), text.pad_id)
    want[[8, 9, 10, 15, 16, 17, 18]] = torch.tensor(ids)
    assert torch.equal(heard[:, U_AUDIO:VIDEO], want.view(6, 5))
    assert heard[:, VIDEO:].eq(IGNORE_INDEX).all()  # nothing else is labelled, the model's own audio neither
    # Packing keeps labels with their positions across a row boundary, and padding holds none.
    rows = pack_rows(iter([((0,), tok), ((1,), tok), ((2,), tok)]), seq_len=4 * TURN + 7, turn_length=TURN)
    first, _ = next(rows)
    second, _ = next(rows)
    batch = collate([first, second], 4 * TURN + 7)
    assert torch.equal(batch.heard_text[0, : 4 * TURN], tok.heard_text[: 4 * TURN])
    assert torch.equal(batch.heard_text[1, : 4 * TURN], torch.cat([tok.heard_text[4 * TURN:], tok.heard_text[: 2 * TURN]]))
    assert batch.heard_text[:, 4 * TURN:].eq(IGNORE_INDEX).all()  # the padding at the end of each row
    # An episode without the user's words (a recording with no transcript) has no labels at all.
    ep.words.pop("user")
    assert interleave(ep, layout, dmel, text).heard_text.eq(IGNORE_INDEX).all()


def test_validate_rejects_broken_batches(layout, dmel, text):
    tok = interleave(make_episode(0.4), layout, dmel, text)
    good = collate([[tok]], 60)
    target_kind = good.target_kind.clone()
    target_kind[0, 19] = Kind.AUDIO  # position 20 is user audio of the next turn, not a model output
    target_audio = torch.cat([good.target_audio[:4], good.audio_bins[5:6], good.target_audio[4:]])
    bad = replace(good, target_kind=target_kind, payload={**good.payload, "target_audio": target_audio})
    with pytest.raises(BatchError, match="not the next MODEL position"):
        bad.validate()
    with pytest.raises(BatchError, match="audio_bins"):
        replace(good, payload={**good.payload, "audio_bins": good.audio_bins[1:]}).validate()
    # Each modality spec checks its own payload: dense text ids only on TEXT positions, patches as uint8 rows,
    # text targets exactly where target_kind says TEXT, audio targets one row per AUDIO target.
    text_ids = good.text_ids.clone()
    text_ids[0, 0] = 5  # position 0 is user audio
    with pytest.raises(BatchError, match="text_ids must be 0 where kind != TEXT"):
        replace(good, payload={**good.payload, "text_ids": text_ids}).validate()
    video = make_batch([[2]], L=2 * TURN, vocab=50)  # hand-made batch with a frame every micro-turn
    with pytest.raises(BatchError, match="patches has dtype torch.int64"):
        replace(video, payload={**video.payload, "patches": video.patches.long()}).validate()
    with pytest.raises(BatchError, match=r"patch_rc has shape \(1, 2\), expected \[8, 2\]"):
        replace(video, payload={**video.payload, "patch_rc": video.patch_rc[:1]}).validate()
    target_text = good.target_text.clone()
    target_text[0, 0] = 3  # position 0 predicts nothing
    with pytest.raises(BatchError, match="target_text must be set exactly where target_kind == TEXT"):
        replace(good, payload={**good.payload, "target_text": target_text}).validate()
    with pytest.raises(BatchError, match="target_audio has shape"):
        replace(good, payload={**good.payload, "target_audio": good.target_audio[1:]}).validate()
    payload = dict(good.payload)
    del payload["patch_rc"]
    with pytest.raises(BatchError, match=r"missing \['patch_rc'\], unknown \[\]"):
        replace(good, payload=payload).validate()
    assert good.doc_ids[0, 40:].eq(-1).all() and good.kind[0, 40:].eq(Kind.PAD).all()
