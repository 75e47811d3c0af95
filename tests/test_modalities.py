"""A modality is one file: the README's worked example (an IMU sensor on the user stream) added to a scratch copy of
``tml`` as one new module plus its entry in ``MODALITIES``, then run through the whole pipeline with no other edit
(that ``tml.streams`` stays below ``tml.model`` is tests/test_layers.py's)."""

import pytest

from conftest import ROOT, run_in_scratch

# The new file, exactly as README "Adding a modality or a head" shows it.
IMU_MODULE = '''
"""IMU: a 6-axis motion sensor on the user stream, one position per micro-turn (its mean reading), embedded by a
linear layer. Episodes carry it as ``arrays["imu"]``: float32 [samples, 6] at RATE_HZ (``KEY.imu.npy``)."""

import torch
from torch import nn

from tml.errors import ConfigError
from tml.streams.modalities.base import PAD, LiveInput, Modality

RATE_HZ, AXES = 50, 6


class ImuModality(Modality):
    def check_slot(self, cfg, slot, where):
        if slot.kind == self.name and slot.count != 1:
            raise ConfigError(f"{where}.count={slot.count}: an imu run has 1 slot per micro-turn")

    def encode(self, episode, slot, layout, dmel, text, num_turns):
        x, per = episode.arrays.get("imu"), RATE_HZ * layout.cfg.micro_turn_ms // 1000
        live = LiveImu()
        return [live(None if x is None else x[t * per : (t + 1) * per], t) for t in range(num_turns)], 0

    def live(self, slot, layout, dmel, pad_id):
        return LiveImu()

    def embedder(self, cfg):
        return nn.Linear(AXES, cfg.dim)

    def num_params(self, cfg):
        return AXES * cfg.dim + cfg.dim

    def shapes(self, batch):
        return {"imu": (torch.float32, (int((batch.kind == self.kind).sum()), AXES))}

    def empty(self, cfg=None):
        return {"imu": torch.zeros(0, AXES)}


IMU = ImuModality(kind=4, name="imu", fields=("imu",), dense=False)


class LiveImu(LiveInput):
    """A micro-turn's readings [n, 6] (or None, or none at all: an empty slot) -> one position, their mean."""

    def __call__(self, value, turn):
        if value is None or len(value) == 0:
            return PAD, {}
        return IMU.kind, {"imu": value.float().mean(0, keepdim=True)}
'''

# What the scratch copy runs: shards round trip, interleave, collate (validates), the model's forward and backward,
# and the streaming session fed live and from the recording.
SCRIPT = '''
import math, tempfile
import torch
from tml.audio.dmel import DMelTokenizer
from tml.eval.generate import turn_positions
from tml.eval.session import MicroTurnInputs, SessionConfig, StreamingSession
from tml.model import InteractionModel, ModelConfig, MoEConfig, compute_losses, param_counts
from tml.model.counts import count_params
from tml.streams import Episode, Kind, LayoutConfig, MicroTurnLayout, SlotConfig, Stream, Word
from tml.streams.interleave import interleave
from tml.streams.pack import collate
from tml.text.tokenizer import train_bpe

torch.manual_seed(0)
sr, turns = 16000, 3
t = torch.arange(int(turns * 0.2 * sr)) / sr
imu = torch.randn(25, 6)  # 0.5 s at 50 Hz: the third micro-turn has 5 readings
episode = Episode(key="ep", duration=turns * 0.2, sample_rate=sr,
                  audio={"user": 0.3 * torch.sin(2 * math.pi * 300 * t), "model": 0.05 * torch.randn(t.numel())},
                  words={"model": [Word("hello", 0.25, 0.4)]}, arrays={"imu": imu})
episode = Episode.from_sample(episode.to_sample())  # KEY.imu.npy in the shard
assert torch.equal(episode.arrays["imu"], imu)

slots = [SlotConfig("user", "audio", 5), SlotConfig("user", "imu", 1), SlotConfig("model", "text", 4),
         SlotConfig("model", "audio", 5)]
layout = MicroTurnLayout(LayoutConfig(slots=slots))
text = train_bpe(["hello there"] * 20, 300, tempfile.mkdtemp() + "/tokenizer.json")
dmel = DMelTokenizer()
tok = interleave(episode, layout, dmel, text)
assert [int(k) for k in tok.kind[5::15]] == [Kind.IMU] * 3 and Kind.IMU == 4
expected = torch.stack([imu[0:10].mean(0), imu[10:20].mean(0), imu[20:25].mean(0)])  # by hand: 10 readings each
assert torch.allclose(tok.imu, expected)

batch = collate([[tok]], 3 * layout.length)  # validates, the IMU rows included
assert torch.equal(batch.imu, tok.imu)
model = InteractionModel(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=text.vocab_size,
                                     dense_layers=1, dense_hidden_dim=64, moe=MoEConfig(hidden_dim=32, num_experts=2,
                                                                                         top_k=1)))
assert "embed.imu.weight" in model.state_dict() and "embed.audio.table.weight" in model.state_dict()
assert param_counts(model)["total"] == count_params(model.cfg).total  # the planner counts the new embedder
x = model.embed(batch)
user_row = model.embed.stream.weight[int(Stream.USER)]
assert torch.allclose(x[0, 5::15], model.embed.imu(expected) + user_row, atol=1e-6)  # by hand: linear + stream
loss = compute_losses(model(batch), batch)["loss"]
loss.backward()
assert model.embed.imu.weight.grad.abs().sum() > 0  # the readings reach the loss

def run(inputs):
    session = StreamingSession(model, layout, dmel, SessionConfig(cache_window=0), text.pad_id)
    return [session.step(inputs(k)) for k in range(turns)]

recorded = run(lambda k: MicroTurnInputs(positions=turn_positions(tok, layout, k)))
bins = tok.audio_bins[tok.stream[tok.kind == Kind.AUDIO] == Stream.USER].view(turns, 20, 80)
live = run(lambda k: MicroTurnInputs(user_audio=bins[k], streams={"user.imu": imu[10 * k : 10 * (k + 1)]}))
still = run(lambda k: MicroTurnInputs(user_audio=bins[k], streams={"user.imu": torch.zeros(10, 6)}))
for a, b in zip(recorded, live):
    assert torch.allclose(a.text_logits, b.text_logits, atol=1e-5) and a.text_ids == b.text_ids
assert not torch.allclose(recorded[0].text_logits, still[0].text_logits, atol=1e-5)  # the model hears the sensor
print("imu ok")
'''



SECOND_CHANNEL = '''
import math, tempfile
import torch
from tml.audio.dmel import DMelTokenizer
from tml.eval.generate import turn_positions
from tml.eval.session import MicroTurnInputs, SessionConfig, StreamingSession
from tml.model import InteractionModel, ModelConfig, MoEConfig
from tml.streams import Episode, Kind, LayoutConfig, MicroTurnLayout, SlotConfig, Stream
from tml.streams.interleave import interleave
from tml.streams.pack import collate
from tml.text.tokenizer import train_bpe

torch.manual_seed(0)
sr, turns = 16000, 3
t = torch.arange(int(turns * 0.2 * sr)) / sr
waves = {"user": 0.3 * torch.sin(2 * math.pi * 300 * t), "user2": 0.3 * torch.sin(2 * math.pi * 900 * t),
         "model": 0.05 * torch.randn(t.numel())}
episode = Episode.from_sample(Episode(key="ep", duration=turns * 0.2, sample_rate=sr, audio=waves).to_sample())
assert sorted(episode.audio) == ["model", "user", "user2"]  # KEY.user2.wav in the shard
slots = [SlotConfig("user", "audio", 5), SlotConfig("user2", "audio", 5), SlotConfig("model", "text", 4),
         SlotConfig("model", "audio", 5)]
layout = MicroTurnLayout(LayoutConfig(slots=slots))
text = train_bpe(["hello there"] * 20, 300, tempfile.mkdtemp() + "/tokenizer.json")
dmel = DMelTokenizer()
tok = interleave(episode, layout, dmel, text)
audio_stream = tok.stream[tok.kind == Kind.AUDIO]
user2 = tok.audio_bins[audio_stream == Stream.USER2].view(turns, 20, 80)
assert torch.equal(user2, dmel.encode(episode.audio["user2"])[: turns * 20].view(turns, 20, 80))
batch = collate([[tok]], 3 * layout.length)
model = InteractionModel(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=text.vocab_size,
                                     dense_layers=1, dense_hidden_dim=64, moe=MoEConfig(hidden_dim=32, num_experts=2,
                                                                                         top_k=1)))
assert model.embed.stream.weight.shape[0] == 5
model(batch)

def run(inputs):
    session = StreamingSession(model, layout, dmel, SessionConfig(cache_window=0), text.pad_id)
    return [session.step(inputs(k)) for k in range(turns)]

user = tok.audio_bins[audio_stream == Stream.USER].view(turns, 20, 80)
recorded = run(lambda k: MicroTurnInputs(positions=turn_positions(tok, layout, k)))
live = run(lambda k: MicroTurnInputs(user_audio=user[k], streams={"user2.audio": user2[k]}))
for a, b in zip(recorded, live):
    assert torch.allclose(a.text_logits, b.text_logits, atol=1e-5) and a.text_ids == b.text_ids
print("user2 ok")
'''


def register(module: str, spec: str):
    """The edit of ``tml/streams/modalities/__init__.py`` that adds ``spec`` (from ``modalities/<module>.py``) to
    ``MODALITIES``."""
    def edit(src: str) -> str:
        entry = "MODALITIES: tuple[Modality, ...] = (TEXT, AUDIO, PATCH)"
        assert entry in src
        return src.replace(entry, f"from tml.streams.modalities.{module} import {spec}  # noqa: E402\n"
                           + entry.replace("PATCH)", f"PATCH, {spec})"))
    return edit


def test_a_new_modality_is_one_file_and_its_entry_in_modalities(tmp_path):
    """README's IMU example: add ``modalities/imu.py`` and its line in ``MODALITIES`` to a copy of ``tml``, nothing
    else; shards, interleave, collate/validate, embedding (checked by hand), loss and the streaming session (live
    input == the recording's positions) all run with it."""
    changed = run_in_scratch(tmp_path, {"tml/streams/modalities/imu.py": lambda _: IMU_MODULE,
                                        "tml/streams/modalities/__init__.py": register("imu", "IMU")}, SCRIPT)
    assert changed == {"tml/streams/modalities/imu.py", "tml/streams/modalities/__init__.py"}


def test_a_second_user_audio_channel_is_one_stream_member(tmp_path):
    """README's second channel: ``Stream.USER2`` in a copy of ``tml``, nothing else; its wave goes through the shard,
    interleave (its bins = the dMel of its wave), collate, the model, and a live session that matches the recording."""
    def add_user2(src: str) -> str:
        assert "    VIDEO = 3\n" in src
        return src.replace("    VIDEO = 3\n", "    VIDEO = 3\n    USER2 = 4\n")

    changed = run_in_scratch(tmp_path, {"tml/streams/layout.py": add_user2}, SECOND_CHANNEL)
    assert changed == {"tml/streams/layout.py"}


# A modality the model *writes*: one spec file, one head file, the head's config entry; the session untouched.
GESTURE_MODULE = '''
"""Gesture: what an avatar does with its head in a micro-turn (0 = nothing, 1 = nod, 2 = shake, ...), one position
per micro-turn on the model stream; the model writes it. Episodes carry it as ``arrays["gesture"]``: int64 [micro-turns]
(``KEY.gesture.npy``)."""

import torch
from torch import nn

from tml.errors import ConfigError
from tml.streams.modalities.base import Modality

GESTURES = 8


class GestureModality(Modality):
    def check_slot(self, cfg, slot, where):
        if slot.kind == self.name and (slot.stream != "model" or slot.count != 1):
            raise ConfigError(f"{where}: a gesture run is one model slot per micro-turn")

    def encode(self, episode, slot, layout, dmel, text, num_turns):
        ids = torch.zeros(num_turns, dtype=torch.long)  # nothing where the episode has no gestures
        given = episode.arrays.get("gesture")
        if given is not None:  # the model's streams lead (tml.streams.interleave)
            given = given[layout.cfg.model_lead_turns :][:num_turns]
            ids[: len(given)] = given
        return [(self.kind, {"gesture_ids": ids[t : t + 1]}) for t in range(num_turns)], 0

    def embedder(self, cfg):
        return nn.Embedding(GESTURES, cfg.dim)

    def num_params(self, cfg):
        return GESTURES * cfg.dim


GESTURE = GestureModality(kind=4, name="gesture", fields=("gesture_ids",), dense=True, target="target_gesture")
'''

GESTURE_HEAD = '''
"""The gesture head: hidden state -> which gesture the next model gesture slot holds."""

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.heads.base import OutputHead
from tml.model.sampling import sample_logits
from tml.streams.modalities import Kind
from tml.streams.modalities.gesture import GESTURES


class GestureHead(OutputHead):
    """Hidden [N, dim] -> gesture logits [N, GESTURES]."""

    kind = Kind.GESTURE

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, GESTURES)

    @classmethod
    def from_config(cls, cfg, embed):
        return cls(cfg.dim)

    @staticmethod
    def num_params(cfg):
        return cfg.dim * GESTURES + GESTURES

    def forward(self, h):
        return self.proj(h)

    def loss(self, h, target, logits=None):
        return F.cross_entropy((self(h) if logits is None else logits).float(), target, reduction="none")

    @torch.no_grad()
    def sample(self, h, cfg, generator=None, logits=None, speak=None):
        """Gesture ids long [N], drawn at ``text_temperature``; none (0) where the floor decision is silent."""
        g = sample_logits(self(h) if logits is None else logits, cfg.text_temperature, cfg.text_top_p, generator)
        return g if speak is None else torch.where(speak, g, torch.zeros_like(g))
'''

GESTURE_SCRIPT = """
import math, tempfile
import torch
from tml.audio.dmel import DMelTokenizer
from tml.eval.generate import generate_model_side, turn_positions
from tml.eval.session import MicroTurnInputs, SessionConfig, StreamingSession
from tml.model import InteractionModel, ModelConfig, MoEConfig, compute_losses, param_counts
from tml.model.counts import count_params
from tml.model.sampling import SamplingConfig
from tml.streams import Episode, Kind, LayoutConfig, MicroTurnLayout, SlotConfig, Stream, Word
from tml.streams.interleave import interleave
from tml.streams.pack import collate
from tml.text.tokenizer import train_bpe

torch.manual_seed(0)
sr, turns = 16000, 4
t = torch.arange(int(turns * 0.2 * sr)) / sr
gesture = torch.tensor([0, 1, 2, 1])
episode = Episode(key="ep", duration=turns * 0.2, sample_rate=sr,
                  audio={"user": 0.3 * torch.sin(2 * math.pi * 300 * t), "model": 0.05 * torch.randn(t.numel())},
                  words={"model": [Word("hello", 0.25, 0.4)]}, arrays={"gesture": gesture})
episode = Episode.from_sample(episode.to_sample())  # KEY.gesture.npy in the shard
slots = [SlotConfig("user", "audio", 5), SlotConfig("model", "text", 4), SlotConfig("model", "audio", 5),
         SlotConfig("model", "gesture", 1)]
layout = MicroTurnLayout(LayoutConfig(slots=slots))
text = train_bpe(["hello there"] * 20, 300, tempfile.mkdtemp() + "/tokenizer.json")
dmel = DMelTokenizer()
tok = interleave(episode, layout, dmel, text)
where = tok.kind == Kind.GESTURE
assert where.sum() == turns and Kind.GESTURE == 4
assert tok.gesture_ids[where].tolist() == [1, 2, 1, 0]  # the model's stream leads by one micro-turn

batch = collate([[tok]], turns * layout.length)  # validates; gesture targets where the next position is one
assert batch.target_gesture[batch.target_kind == Kind.GESTURE].tolist() == [1, 2, 1, 0]
cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=text.vocab_size, dense_layers=1,
                  dense_hidden_dim=64, moe=MoEConfig(hidden_dim=32, num_experts=2, top_k=1))
cfg.heads.gesture = True
model = InteractionModel(cfg)
assert "gesture_head.proj.weight" in model.state_dict() and "embed.gesture.weight" in model.state_dict()
assert param_counts(model)["total"] == count_params(model.cfg).total  # the planner counts embedder and head
out = model(batch)
losses = compute_losses(out, batch)
want = torch.nn.functional.cross_entropy(out.hidden[batch.target_kind == Kind.GESTURE] @ model.gesture_head.proj.weight.T
                                         + model.gesture_head.proj.bias, torch.tensor([1, 2, 1, 0]))
assert torch.allclose(losses["loss/gesture"], want, atol=1e-6), (losses["loss/gesture"], want)
losses["loss"].backward()
assert model.gesture_head.proj.weight.grad.abs().sum() > 0 and model.embed.gesture.weight.grad.abs().sum() > 0

# The streaming session writes it with no edit: teacher-forced on the recording, its gesture logits are the
# training forward's; free, it writes the head's draw and feeds it back.
model.eval()
with torch.no_grad():
    ref = model(batch)
n = layout.length
def forced(k):
    sl = slice(k * n, (k + 1) * n)
    kind, stream = tok.kind[sl], tok.stream[sl]
    model_audio = ((tok.stream == Stream.MODEL) & (tok.kind == Kind.AUDIO))[tok.kind == Kind.AUDIO]
    audio = tok.audio_bins[model_audio].view(turns, -1, 80)[k]
    return {"text": tok.text_ids[sl][(stream == Stream.MODEL) & (kind == Kind.TEXT)].tolist(), "audio": audio,
            "gesture": tok.gesture_ids[sl][kind == Kind.GESTURE]}
session = StreamingSession(model, layout, dmel, SessionConfig(cache_window=0), text.pad_id)
outs = [session.step(MicroTurnInputs(positions=turn_positions(tok, layout, k)), force=forced(k)) for k in range(turns)]
assert [int(g) for o in outs for g in o.written["gesture"]] == [1, 2, 1, 0]  # forced: the recording's
streamed = torch.cat([o.logits["gesture"] for o in outs])
assert torch.allclose(streamed, ref.gesture_logits, atol=1e-5), (streamed - ref.gesture_logits).abs().max()
assert torch.allclose(torch.cat([o.text_logits for o in outs]), ref.text_logits, atol=1e-5)
free = StreamingSession(model, layout, dmel, SessionConfig(cache_window=0, sampling=SamplingConfig(floor="none")),
                        text.pad_id)
drawn = []
for k in range(turns):
    o = free.step(MicroTurnInputs(positions=turn_positions(tok, layout, k)))
    assert o.written["gesture"].tolist() == o.logits["gesture"].argmax(-1).tolist()  # greedy: the argmax
    drawn += o.written["gesture"].tolist()
generated = generate_model_side(model, tok, layout, dmel, SamplingConfig(floor="none"), text.pad_id)
assert generated.payload["gesture_ids"][where].tolist() == drawn  # free generation writes it into the episode
print("gesture ok")
"""


def add_gesture_head(src: str) -> str:
    line, switch = '    "listen": {True: "tml.model.heads.listen:ListenHead", False: None},\n', "    listen: bool = False\n"
    assert line in src and switch in src
    return src.replace(line, line + '    "gesture": {True: "tml.model.heads.gesture:GestureHead", False: None},\n') \
        .replace(switch, switch + "    gesture: bool = False\n")


def test_a_modality_the_model_writes_is_its_spec_its_head_and_their_entries(tmp_path):
    """A gesture stream the model writes: ``modalities/gesture.py`` and its line in ``MODALITIES``,
    ``heads/gesture.py`` and its entry in ``tml/model/config.py`` (``HEADS`` line, ``HeadsConfig`` switch) added to a
    copy of ``tml``, nothing else (not the session): shards, interleave (the model's lead), collate's targets, the
    planner's count, the loss by hand and its gradient, and the streaming session, whose teacher-forced gesture
    logits equal the training forward's and whose free draw is fed back and lands in free generation's episode."""
    changed = run_in_scratch(tmp_path, {"tml/streams/modalities/gesture.py": lambda _: GESTURE_MODULE,
                                        "tml/streams/modalities/__init__.py": register("gesture", "GESTURE"),
                                        "tml/model/heads/gesture.py": lambda _: GESTURE_HEAD,
                                        "tml/model/config.py": add_gesture_head}, GESTURE_SCRIPT)
    assert changed == {"tml/streams/modalities/gesture.py", "tml/streams/modalities/__init__.py",
                       "tml/model/heads/gesture.py", "tml/model/config.py"}


def test_kind_is_built_from_the_specs_and_refuses_a_repeated_value_or_name():
    from tml.streams.modalities import MODALITIES, Kind, Modality, _kind_enum

    assert [(k.name, int(k)) for k in Kind] == [("PAD", 0)] + [(m.name.upper(), m.kind) for m in MODALITIES]
    again = Modality(kind=MODALITIES[0].kind, name="imu", fields=("imu",), dense=False)
    with pytest.raises(ValueError, match=f"{MODALITIES[0].name.upper()} and IMU share"):
        _kind_enum((*MODALITIES, again))
    with pytest.raises(ValueError, match="PAD and PAD share"):
        _kind_enum((*MODALITIES, Modality(kind=9, name="pad", fields=("x",), dense=True)))
