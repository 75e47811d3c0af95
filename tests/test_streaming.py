"""Trainer-sampler alignment: the streaming session's step-by-step logits equal the training forward's."""

import pytest
import torch

from conftest import STREAM_TURNS as TURNS
from conftest import turn_inputs
from tml.errors import ConfigError
from tml.eval.session import SessionConfig, StreamingSession
from tml.model.attention import ContextFullError
from tml.model.sampling import SamplingConfig
from tml.model import HeadsConfig, InteractionModel, ModelConfig, MoE, MoEConfig
from tml.streams import Batch
from tml.streams.pack import collate


def run_session(setup, cfg=None):
    model, layout, dmel, text, episode, tok = setup
    session = StreamingSession(model, layout, dmel, cfg)
    outs = []
    for t in range(TURNS):
        inputs, force = turn_inputs(tok, layout, episode, t)
        outs.append(session.step(inputs, force=force))
    return session, outs


def test_session_logits_equal_training_forward(setup):
    model, layout, dmel, text, episode, tok = setup
    batch = collate([[tok]], TURNS * layout.length)
    with torch.no_grad():
        ref = model(batch)
    _, outs = run_session(setup)
    text_logits = torch.cat([o.text_logits for o in outs])
    audio_logits = torch.cat([o.audio_logits for o in outs])
    assert text_logits.shape == ref.text_logits.shape and audio_logits.shape == ref.audio_logits.shape
    assert (text_logits - ref.text_logits).abs().max() <= 1e-5
    assert (audio_logits - ref.audio_logits).abs().max() <= 1e-5
    assert torch.equal(text_logits.argmax(-1), ref.text_logits.argmax(-1))
    assert torch.equal(audio_logits.argmax(-1), ref.audio_logits.argmax(-1))


def test_session_reads_out_what_the_listen_head_heard_as_the_training_forward_does(setup):
    """A model with a listen head: each micro-turn's ``heard_ids`` are the argmax of the training forward's listen
    logits at that micro-turn's user audio positions (every one is labelled: the episode has the user's words)."""
    _, layout, dmel, text, episode, tok = setup
    torch.manual_seed(0)
    model = InteractionModel(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=text.vocab_size,
                                         moe=MoEConfig(hidden_dim=64, num_experts=4, top_k=2),
                                         heads=HeadsConfig(listen=True))).eval()
    batch = collate([[tok]], TURNS * layout.length)
    with torch.no_grad():
        ref = model(batch)
    assert ref.listen_logits.shape[0] == TURNS * 5
    _, outs = run_session((model, layout, dmel, text, episode, tok))
    assert all(len(o.heard_ids) == 5 for o in outs)
    assert [i for o in outs for i in o.heard_ids] == ref.listen_logits.argmax(-1).tolist()
    assert StreamingSession(setup[0], layout, dmel).step(turn_inputs(tok, layout, episode, 0)[0]).heard_ids is None


def banded_training_forward(setup, window, sinks):
    """The training forward over the streaming episode under the mask a windowed session attends with: causal,
    within ``window`` positions, plus the first ``sinks`` positions."""
    model, layout, dmel, text, episode, tok = setup
    batch = collate([[tok]], TURNS * layout.length)
    full = Batch.attention_mask(batch)
    i = torch.arange(full.shape[-1])
    banded = full & (((i[:, None] - i[None, :]) < window) | (i[None, :] < sinks))

    class BandedBatch(Batch):
        def attention_mask(self):
            return banded

    with torch.no_grad():
        return model(BandedBatch(**batch.__dict__))


@pytest.mark.parametrize("sinks", [0, 4])
def test_bounded_cache_equals_a_banded_training_mask(setup, sinks):
    # A window of 50 positions (2.5 micro-turns) in a ring of preallocated slots, optionally with attention sinks:
    # the training forward under the matching mask (band, plus the first `sinks` positions) gives the same logits.
    layout = setup[1]
    window = 50
    ref = banded_training_forward(setup, window, sinks)
    session, outs = run_session(setup, SessionConfig(cache_window=window, attention_sinks=sinks))
    assert (torch.cat([o.text_logits for o in outs]) - ref.text_logits).abs().max() <= 1e-5
    assert (torch.cat([o.audio_logits for o in outs]) - ref.audio_logits).abs().max() <= 1e-5
    assert session.cache.capacity == sinks + window + layout.length + 1  # allocated once, never grown
    assert len(session.cache) <= session.cache.capacity


def test_compiled_decode_step_equals_a_banded_training_mask(setup, monkeypatch):
    """session.compile=true: output positions through torch.compile'd ``decode_position`` (the new key merged into the
    cache's log-sum-exp, the cache written after) give the banded training forward's logits, sinks and ring wrap
    included, as the eager step does; refused where it cannot run."""
    model, layout, dmel = setup[:3]
    window, sinks = 50, 4
    ref = banded_training_forward(setup, window, sinks)
    session, outs = run_session(setup, SessionConfig(cache_window=window, attention_sinks=sinks, compile=True))
    assert session.decode_position is not None
    assert (torch.cat([o.text_logits for o in outs]) - ref.text_logits).abs().max() <= 1e-5
    assert (torch.cat([o.audio_logits for o in outs]) - ref.audio_logits).abs().max() <= 1e-5
    with pytest.raises(ConfigError, match="session.cache_window"):
        StreamingSession(model, layout, dmel, SessionConfig(cache_window=0, compile=True))
    monkeypatch.setattr(MoE, "DECODE_DENSE_MAX", 0)  # experts decoded one by one: no single graph
    with pytest.raises(ConfigError, match="decode a session's token dense"):
        StreamingSession(model, layout, dmel, SessionConfig(compile=True))


def test_static_cache_equals_growing_cache(setup):
    # Full context: a cache allocated once for the whole session and one that starts at 8 slots and grows by doubling
    # (re-placing its entries each time) hold the same keys in the same slots, so the logits are bitwise equal.
    model, layout, dmel, text, episode, tok = setup
    cfg = SessionConfig(cache_window=0, max_context=TURNS * layout.length)
    static, outs_static = run_session(setup, cfg)
    assert static.cache.capacity == TURNS * layout.length
    growing = StreamingSession(model, layout, dmel, cfg)
    growing.cache.capacity = 8
    outs = []
    for t in range(TURNS):
        inputs, force = turn_inputs(tok, layout, episode, t)
        outs.append(growing.step(inputs, force=force))
    assert growing.cache.capacity > 8
    for a, b in zip(outs_static, outs):
        assert torch.equal(a.text_logits, b.text_logits) and torch.equal(a.audio_logits, b.audio_logits)
    # Past max_context a full-context session stops with a message that says what to change.
    with pytest.raises(ContextFullError, match="session.cache_window"):
        growing.step(turn_inputs(tok, layout, episode, 0)[0])


def test_greedy_session_writes_the_argmax_and_feeds_it_back(setup):
    model, layout, dmel, text, episode, tok = setup
    session = StreamingSession(model, layout, dmel, SessionConfig(sampling=SamplingConfig(floor="none")))
    for t in range(3):
        inputs, _ = turn_inputs(tok, layout, episode, t)
        out = session.step(inputs)
        assert out.text_ids == out.text_logits.argmax(-1).tolist()
        assert torch.equal(out.audio_bins, out.audio_logits.argmax(-1).reshape(-1, 80))
        assert out.mel.shape == (20, 80) and out.wave is None
    assert session.position == 3 * layout.length


def test_wave_input_matches_offline_dmel_away_from_turn_edges(setup):
    # Streaming encode of a wave equals offline encode except the last frame of each micro-turn, whose window
    # reaches 2.5 ms into the next one (zero-padded live).
    from tml.streams.modalities.audio import LiveAudio

    model, layout, dmel, text, episode, tok = setup
    user = LiveAudio(layout.slots[0], layout, dmel)  # what the session's user audio slots read
    wave = episode.audio["user"]
    offline = dmel.encode(wave)
    for t in range(4):
        live = user.bins(wave[t * 3200 : (t + 1) * 3200])
        assert torch.equal(live[:-1], offline[t * 20 : t * 20 + 19])


def test_flow_head_session_speaks_continuous_mel_and_keeps_text_aligned(setup):
    _, layout, dmel, text, episode, tok = setup
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=text.vocab_size,
                      moe=MoEConfig(hidden_dim=64, num_experts=4, top_k=2))
    cfg.heads.audio = "flow"
    model = InteractionModel(cfg).eval()
    batch = collate([[tok]], TURNS * layout.length)
    with torch.no_grad():
        ref = model(batch)
    session = StreamingSession(model, layout, dmel)
    outs = []
    for t in range(TURNS):
        inputs, force = turn_inputs(tok, layout, episode, t)
        outs.append(session.step(inputs, force=force))
    assert (torch.cat([o.text_logits for o in outs]) - ref.text_logits).abs().max() <= 1e-5
    with torch.no_grad():  # a floor head that always speaks: the micro-turn's audio is the flow head's own sample
        model.floor_head.proj.bias.fill_(20.0)
    free = StreamingSession(model, layout, dmel).step(turn_inputs(tok, layout, episode, 0)[0])
    assert free.speaks
    assert free.audio_logits is None and free.mel.shape == (20, 80)
    lo, hi = dmel.cfg.log_min, dmel.cfg.log_max
    assert (free.mel >= lo).all() and (free.mel <= hi).all() and not torch.equal(free.mel, dmel.decode(free.audio_bins))


@pytest.mark.parametrize("leaver", [0, 2])
def test_batched_sessions_equal_separate_sessions(setup, leaver):
    # Three sessions with different inputs and seeds, sampled (temperature 1): session 2 joins two micro-turns late
    # (its own, shorter cache) and session `leaver` leaves after four (session 0: the cache copies the rows it keeps;
    # session 2, the last row: it keeps a view of the first two). Each must write exactly what it writes alone.
    model, layout, dmel, text, episode, tok = setup
    cfg = SessionConfig(sampling=SamplingConfig(text_temperature=1.0, audio_temperature=1.0, seed=0))
    feeds = [[turn_inputs(tok, layout, episode, (t + 3 * b) % TURNS)[0] for t in range(6)] for b in range(3)]
    for t in range(6):  # session 1 without video, session 2 with background text from the start
        feeds[1][t].video_frame = None
    feeds[2][0].background_text = [5, 6, 7]
    spans = {0: (0, 6), 1: (0, 6), 2: (2, 6)}  # micro-turns each session is live (global clock)
    spans[leaver] = (spans[leaver][0], 4)
    alone = {}
    for b, (a, z) in spans.items():
        s = StreamingSession(model, layout, dmel, cfg, seeds=[10 + b])
        alone[b] = [s.step(feeds[b][t - a]) for t in range(a, z)]
    batched = StreamingSession(model, layout, dmel, cfg, sessions=2, seeds=[10, 11])
    live, got = [0, 1], {b: [] for b in spans}
    for t in range(6):
        if t == 2:
            batched.add_sessions([12])
            live.append(2)
        if t == 4:
            batched.keep([b for b in range(3) if b != leaver])
            live.remove(leaver)
        outs = batched.step_many([feeds[b][t - spans[b][0]] for b in live])
        for b, o in zip(live, outs):
            got[b].append(o)
    for b in spans:
        assert len(got[b]) == len(alone[b])
        for x, y in zip(got[b], alone[b]):
            assert x.text_ids == y.text_ids and x.background_ids == y.background_ids
            assert torch.equal(x.audio_bins, y.audio_bins)
            assert (x.text_logits - y.text_logits).abs().max() <= 1e-5
            assert (x.audio_logits - y.audio_logits).abs().max() <= 1e-5
    # Sampling really is per session: the same input under another seed writes something else.
    other = StreamingSession(model, layout, dmel, cfg, seeds=[99]).step(feeds[1][0])
    assert other.text_ids != got[1][0].text_ids or not torch.equal(other.audio_bins, got[1][0].audio_bins)


def test_bfloat16_cache_stays_near_the_training_forward(setup):
    # session.cache_dtype="bfloat16": keys and values kept (and attended) in bfloat16. The logits leave the training
    # forward's 1e-5 but stay within bfloat16 rounding of it (~2^-9 relative per key, value and attention output)
    # with the same argmax nearly everywhere, in the full context and in a window (against the banded mask's
    # forward); other dtypes are refused by name. (Batched sessions then equal separate ones only up to that rounding:
    # a ~1e-7 difference between kernels for different batch sizes can round a key to the neighbouring bfloat16.)
    model, layout, dmel, text, episode, tok = setup
    batch = collate([[tok]], TURNS * layout.length)
    full = Batch.attention_mask(batch)
    i = torch.arange(full.shape[-1])
    for window in (0, 50):
        mask = full & ((i[:, None] - i[None, :]) < window) if window else full

        class Masked(Batch):
            def attention_mask(self, _m=mask):
                return _m

        with torch.no_grad():
            ref = model(Masked(**batch.__dict__))
        session, outs = run_session(setup, SessionConfig(cache_window=window, cache_dtype="bfloat16"))
        assert session.cache.k.dtype == torch.bfloat16
        for got, want in ((torch.cat([o.text_logits for o in outs]), ref.text_logits),
                          (torch.cat([o.audio_logits for o in outs]), ref.audio_logits)):
            assert got.dtype == torch.float32
            assert 1e-5 < (got - want).abs().max() <= 2e-3 * want.abs().max()  # 4e-4 of 0.7 measured
            assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95
    with pytest.raises(ConfigError, match="session.cache_dtype"):
        StreamingSession(model, layout, dmel, SessionConfig(cache_dtype="float16"))
