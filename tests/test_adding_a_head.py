"""A head is one file: the README's worked example (a user-speech head, an auxiliary training signal) added to a
scratch copy of ``tml`` as one new module plus its config entry (its line in ``HEADS`` and its switch in
``HeadsConfig``), then built, counted, trained one step by the pretraining recipe and validated with no other edit."""

import json

import pytest
import torch
from torch import nn

from conftest import ROOT, make_batch, run_in_scratch, tiny_cfg
from tml.model import InteractionModel, OutputHead, compute_losses
from tml.model import config as model_config
from tml.streams.batch import IGNORE_INDEX
from tml.train.validation import validation_losses

# The new file, exactly as README "Adding a modality or a head" shows it.
USER_SPEECH_MODULE = '''
"""User speech: at each position followed by a user audio position, P(that position holds speech). An auxiliary
training signal for turn-taking (will the user still be talking?); the streaming session does not sample it."""

import torch
import torch.nn.functional as F
from torch import nn

from tml.model.heads.base import SILENT_BIN, OutputHead
from tml.model.sampling import decide_floor
from tml.streams.layout import Stream
from tml.streams.modalities import Kind


class UserSpeechHead(OutputHead):
    """Hidden [N, dim] -> logit [N] of P(the next user audio position is not silent)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    @classmethod
    def from_config(cls, cfg, embed):
        return cls(cfg.dim)

    @staticmethod
    def num_params(cfg):
        return cfg.dim + 1

    def targets(self, batch):
        """Positions whose next position is a user audio position of the same document; 1 where it has speech."""
        audio = batch.kind == Kind.AUDIO
        spoken = torch.zeros_like(audio)
        spoken[audio] = (batch.audio_bins != SILENT_BIN).flatten(1).any(1)
        query = torch.zeros_like(audio)
        query[:, :-1] = (audio[:, 1:] & (batch.stream[:, 1:] == Stream.USER)
                         & (batch.doc_ids[:, 1:] == batch.doc_ids[:, :-1]) & (batch.doc_ids[:, :-1] >= 0))
        return query, spoken[:, 1:][query[:, :-1]].float()

    def forward(self, h):
        return self.proj(h).squeeze(-1)

    def loss(self, h, target, logits=None):
        logits = self(h) if logits is None else logits
        return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")

    @torch.no_grad()
    def sample(self, h, cfg, generator=None):
        return decide_floor(torch.sigmoid(self(h).float()), "sample", generator)
'''


def add_config_entry(src: str) -> str:
    """The config entry: the head's line in ``HEADS`` and its switch in ``HeadsConfig``."""
    entry = '    "floor": {True: "tml.model.heads.floor:FloorHead", False: None},\n'
    switch = "    floor: bool = True\n"
    assert entry in src and switch in src
    return (src.replace(entry, entry + '    "user_speech": {True: "tml.model.heads.user_speech:UserSpeechHead", '
                                        'False: None},\n')
            .replace(switch, switch + "    user_speech: bool = False\n"))


SCRIPT = '''
import json, subprocess, sys
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, "{root}/tests")
from conftest import make_batch, tiny_cfg
from handmade import write_dataset
from tml.model import HeadsConfig, InteractionModel, compute_losses, param_counts
from tml.model.counts import count_params
from tml.streams import Kind, Stream
from tml.train.validation import validation_losses

torch.manual_seed(0)
model = InteractionModel(tiny_cfg(heads=HeadsConfig(user_speech=True)))
assert "user_speech_head.proj.weight" in model.state_dict()
assert param_counts(model)["total"] == count_params(model.cfg).total  # the planner counts the new head
assert InteractionModel(tiny_cfg()).user_speech_head is None  # switched off by default

batch = make_batch([[3, 2], [4]], 120, 128, seed=1)
batch.audio_bins[::2] = 0  # every other audio position silent: targets of both values
out = model(batch)
losses = compute_losses(out, batch, text_pad_id=0)
# By hand: every position whose next one is a user audio position of its document, and whether that one is silent.
row = (batch.kind == Kind.AUDIO).flatten().cumsum(0).view(batch.shape) - 1
want_h, want_t = [], []
B, L = batch.shape
for b in range(B):
    for i in range(L - 1):
        if (batch.kind[b, i + 1] == Kind.AUDIO and batch.stream[b, i + 1] == Stream.USER
                and batch.doc_ids[b, i] >= 0 and batch.doc_ids[b, i] == batch.doc_ids[b, i + 1]):
            want_h.append(out.hidden[b, i])
            want_t.append(float(batch.audio_bins[row[b, i + 1]].any()))
want_t = torch.tensor(want_t)
assert 0 < want_t.sum() < len(want_t), want_t
torch.testing.assert_close(out.user_speech_targets, want_t)
want = F.binary_cross_entropy_with_logits(model.user_speech_head.proj(torch.stack(want_h)).squeeze(-1), want_t)
torch.testing.assert_close(losses["loss/user_speech"], want)
torch.testing.assert_close(losses["loss"], losses["loss/text"] + losses["loss/audio"] + losses["loss/aux"]
                           + losses["loss/floor"] + losses["loss/user_speech"])
losses["loss"].backward()
assert model.user_speech_head.proj.weight.grad.abs().sum() > 0
val = validation_losses(model, [batch], "cpu", 0)
torch.testing.assert_close(val["val/loss/user_speech"], want.item(), rtol=1e-5, atol=0)
assert val["val/loss"] == val["val/loss/text"] + val["val/loss/audio"]  # content heads only

# One training step by the recipe, the head switched on from the command line, its losses logged.
data = write_dataset(Path("data").resolve(), 12, 4)
run = subprocess.run([sys.executable, "{root}/recipes/pretrain.py", f"data.path={{data}}", f"data.val_path={{data}}",
                      "data.val_batches=1", f"hydra.run.dir={{Path('run').resolve()}}", "trainer.max_steps=1",
                      "trainer.val_every=1", "logger=none",
                      "model.dim=64", "model.n_layers=1", "model.moe.hidden_dim=64", "model.moe.num_experts=4",
                      "data.loader.seq_len=200", "model.heads.user_speech=true"], capture_output=True, text=True)
assert run.returncode == 0, run.stderr[-3000:]
print(json.dumps(json.loads(open("run/metrics.jsonl").read().splitlines()[-1])))
'''


def test_a_new_head_is_one_file_and_its_config_entry(tmp_path):
    """README's user-speech head: ``tml/model/heads/user_speech.py`` and its entry in ``tml/model/config.py`` (a line
    in ``HEADS``, a switch in ``HeadsConfig``) added to a copy of ``tml``, nothing else. The model builds it (state
    key ``user_speech_head.*``), the planner counts it, its targets and loss match a by-hand computation, the total
    loss adds it, its gradient flows, validation reports it, and the recipe trains a step with
    ``model.heads.user_speech=true`` and logs ``loss/user_speech`` and ``val/loss/user_speech``."""
    changed = run_in_scratch(tmp_path, {"tml/model/heads/user_speech.py": lambda _: USER_SPEECH_MODULE,
                                        "tml/model/config.py": add_config_entry}, SCRIPT.format(root=ROOT),
                             timeout=1800)  # a recipe run inside: DeepSpeed's start-up is slow on a loaded machine
    assert changed == {"tml/model/heads/user_speech.py", "tml/model/config.py"}
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1
    for key in ("loss/user_speech", "val/loss/user_speech", "loss/text", "loss/audio", "loss/floor",
                "loss/text_words", "val/loss/text", "val/loss/audio", "val/loss/floor", "val/loss/text_words"):
        assert 0 < record[key] < 20, (key, record.get(key))



class LabelledHead(OutputHead):
    """A head trained on a label field only some batches carry (``probe``, long [B, L], IGNORE_INDEX = none): its
    ``targets`` are None without it, as for a label that live batches lack."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 3)

    @classmethod
    def from_config(cls, cfg, embed):
        return cls(cfg.dim)

    @staticmethod
    def num_params(cfg):
        return 3 * cfg.dim + 3

    def targets(self, batch):
        if "probe" not in batch.payload:
            return None
        where = batch.payload["probe"] != IGNORE_INDEX
        return where, batch.payload["probe"][where]

    def forward(self, h):
        return self.proj(h)

    def loss(self, h, target, logits=None):
        return torch.nn.functional.cross_entropy((self(h) if logits is None else logits).float(), target,
                                                 reduction="none")


def test_a_head_without_labels_in_a_batch_is_left_out_of_its_losses(monkeypatch):
    """A head whose ``targets`` are None for a batch has no logits, loss or logged names in that forward (training
    and validation), and the total is the other heads' alone; with the labels it is trained and reported."""
    monkeypatch.setitem(model_config.HEADS, "probe",
                        {True: "test_adding_a_head:LabelledHead", False: None})
    cfg = tiny_cfg()
    cfg.heads.probe = True  # the config entry's switch (a HeadsConfig field in a real head)
    model = InteractionModel(cfg)
    assert isinstance(model.probe_head, LabelledHead) and model.head_names == ("text", "audio", "floor", "probe")
    batch = make_batch([[3, 2], [4]], 120, 128, seed=1)
    out = model(batch)
    assert "probe" not in out.losses and out.probe_loss is None and out.text_loss is not None
    losses = compute_losses(out, batch, text_pad_id=0)
    assert "loss/probe" not in losses
    assert losses["loss"].item() == (losses["loss/text"] + losses["loss/audio"] + losses["loss/aux"]
                                     + losses["loss/floor"]).item()
    val = validation_losses(model, [batch], "cpu", 0)
    assert "val/loss/probe" not in val and val["val/loss/text"] > 0

    probe = torch.full(batch.shape, IGNORE_INDEX)
    probe[:, ::7] = torch.arange(probe[:, ::7].numel()).view(batch.shape[0], -1) % 3
    batch.payload["probe"] = probe
    out = model(batch)
    want = torch.nn.functional.cross_entropy(model.probe_head(out.hidden[:, ::7].reshape(-1, cfg.dim)),
                                             probe[:, ::7].reshape(-1))
    losses = compute_losses(out, batch, text_pad_id=0, probe_weight=0.5)
    torch.testing.assert_close(losses["loss/probe"], want)
    torch.testing.assert_close(losses["loss"], losses["loss/text"] + losses["loss/audio"] + losses["loss/aux"]
                               + losses["loss/floor"] + 0.5 * want)
    assert validation_losses(model, [batch], "cpu", 0)["val/loss/probe"] == pytest.approx(want.item())
