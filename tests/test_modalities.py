"""A modality is one file: the README's worked example (an IMU sensor on the user stream) added to a scratch copy of
``tml`` as one new module plus its entry in ``MODALITIES``, then run through the whole pipeline with no other edit;
and ``tml.streams`` stays below ``tml.model``."""

import ast

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


def register_imu(src: str) -> str:
    entry = "MODALITIES: tuple[Modality, ...] = (TEXT, AUDIO, PATCH)"
    assert entry in src
    return src.replace(entry, "from tml.streams.modalities.imu import IMU  # noqa: E402\n"
                       + entry.replace("PATCH)", "PATCH, IMU)"))


def test_a_new_modality_is_one_file_and_its_entry_in_modalities(tmp_path):
    """README's IMU example: add ``modalities/imu.py`` and its line in ``MODALITIES`` to a copy of ``tml``, nothing
    else; shards, interleave, collate/validate, embedding (checked by hand), loss and the streaming session (live
    input == the recording's positions) all run with it."""
    changed = run_in_scratch(tmp_path, {"tml/streams/modalities/imu.py": lambda _: IMU_MODULE,
                                        "tml/streams/modalities/__init__.py": register_imu}, SCRIPT)
    assert changed == {"tml/streams/modalities/imu.py", "tml/streams/modalities/__init__.py"}


def test_a_second_user_audio_channel_is_one_stream_member(tmp_path):
    """README's second channel: ``Stream.USER2`` in a copy of ``tml``, nothing else; its wave goes through the shard,
    interleave (its bins = the dMel of its wave), collate, the model, and a live session that matches the recording."""
    def add_user2(src: str) -> str:
        assert "    VIDEO = 3\n" in src
        return src.replace("    VIDEO = 3\n", "    VIDEO = 3\n    USER2 = 4\n")

    changed = run_in_scratch(tmp_path, {"tml/streams/layout.py": add_user2}, SECOND_CHANNEL)
    assert changed == {"tml/streams/layout.py"}


def test_streams_never_imports_a_higher_package():
    """``tml.streams`` (and the modality specs in it, embedders included) sits below model, data, train, eval:
    no module of it imports one of those (DESIGN: data flows one way)."""
    higher = ("tml.model", "tml.data", "tml.train", "tml.eval", "tml.parallel", "tml.serve", "tml.tools")
    found = []
    for path in sorted((ROOT / "tml/streams").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith(higher)]
    assert not found, found


def test_kind_is_built_from_the_specs_and_refuses_a_repeated_value_or_name():
    from tml.streams.modalities import MODALITIES, Kind, Modality, _kind_enum

    assert [(k.name, int(k)) for k in Kind] == [("PAD", 0)] + [(m.name.upper(), m.kind) for m in MODALITIES]
    again = Modality(kind=MODALITIES[0].kind, name="imu", fields=("imu",), dense=False)
    with pytest.raises(ValueError, match=f"{MODALITIES[0].name.upper()} and IMU share"):
        _kind_enum((*MODALITIES, again))
    with pytest.raises(ValueError, match="PAD and PAD share"):
        _kind_enum((*MODALITIES, Modality(kind=9, name="pad", fields=("x",), dense=True)))
