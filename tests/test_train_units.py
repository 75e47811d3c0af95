"""Small pieces of the trainer checked against hand-computed values."""

import json

import pytest
import torch

from tml.train.metrics import truncate_metrics
from tml.train.optim import param_groups, warmup_cosine


def test_warmup_cosine_by_hand():
    f = warmup_cosine(warmup_steps=2, decay_steps=6, min_lr_ratio=0.1)
    # warmup (step+1)/2; then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (step - 2) / 4)); flat at 0.1 after step 6.
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + 2 ** -0.5), 0.55, 0.1 + 0.45 * (1 - 2 ** -0.5), 0.1, 0.1, 0.1]
    assert [f(s) for s in range(9)] == pytest.approx(want, abs=1e-12)


def test_weight_decay_only_on_matrices():
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(5, 4), "proj": torch.nn.Linear(4, 4),
                                 "norm": torch.nn.LayerNorm(4)})
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


def test_truncate_metrics_keeps_what_resume_will_not_rewrite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_validation_loss_is_the_mean_over_all_held_out_targets(tmp_path):
    """Per-batch means weighted by their target counts = the loss of one batch holding every held-out row."""
    from handmade import write_dataset
    from tml.audio.dmel import DMelTokenizer
    from tml.data.loader import LoaderConfig
    from tml.model import InteractionModel, ModelConfig, MoEConfig, compute_losses
    from tml.streams import Batch, LayoutConfig, MicroTurnLayout
    from tml.streams.batch import CORE_FIELDS
    from tml.text.tokenizer import TextTokenizer
    from tml.train.validation import validation_batches, validation_losses

    data = write_dataset(tmp_path / "val", 8, 4)
    text = TextTokenizer.load(data / "tokenizer.json")
    layout, dmel = MicroTurnLayout(LayoutConfig()), DMelTokenizer()
    torch.manual_seed(0)
    model = InteractionModel(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=text.vocab_size,
                                         moe=MoEConfig(hidden_dim=64, num_experts=4, top_k=2))).train()
    batches = validation_batches(str(data), 2, LoaderConfig(seq_len=100, micro_batch_size=2), layout, dmel, text)
    assert len(batches) == 2 and batches[0].kind.shape == (2, 100)
    got = validation_losses(model, batches, "cpu", text.pad_id)
    assert model.training  # left as it was
    # The same 4 rows as one batch: every field is row-major, so the two batches concatenate.
    cat = {f: torch.cat([b.tensors()[f] for b in batches]) for f in batches[0].tensors()}
    whole = Batch(**{f: cat.pop(f) for f in CORE_FIELDS}, payload=cat)
    assert whole.validate().kind.shape == (4, 100)
    model.eval()
    with torch.no_grad():
        ref = compute_losses(model(whole), whole, text_pad_id=text.pad_id)
    for k in ("loss/text", "loss/audio", "loss/text_words"):
        assert got[f"val/{k}"] == pytest.approx(float(ref[k]), rel=1e-5), k
    assert got["val/positions"] == whole.num_tokens()


def test_own_audio_flip_by_hand():
    """Every own-voice micro-turn flipped (prob 1): speech becomes silence, silence takes speech from the batch, inputs
    of other streams and every target stay; prob 0 changes nothing; the same generator seed flips the same."""
    from conftest import make_batch
    from tml.model.heads import SILENT_BIN
    from tml.streams.layout import Stream
    from tml.streams.modalities import Kind
    from tml.train.exposure import flip_own_audio

    batch = make_batch([[3, 2], [4]], L=100, vocab=50)
    own = ((batch.kind == Kind.AUDIO) & (batch.stream == Stream.MODEL))[batch.kind == Kind.AUDIO]
    batch.audio_bins[own.nonzero().flatten()[::3]] = SILENT_BIN  # a third of the own positions silent
    speaking = (batch.audio_bins != SILENT_BIN).flatten(1).any(1)
    flipped, n = flip_own_audio(batch, 1.0, torch.Generator().manual_seed(0))
    assert n == 9  # every micro-turn of the 3 documents (3 + 2 + 4)
    now = (flipped.audio_bins != SILENT_BIN).flatten(1).any(1)
    assert (now[own] == ~speaking[own]).all()
    donors = {tuple(x.flatten().tolist()) for x in batch.audio_bins[own & speaking]}
    assert all(tuple(x.flatten().tolist()) in donors for x in flipped.audio_bins[own & ~speaking])
    assert torch.equal(flipped.audio_bins[~own], batch.audio_bins[~own])
    assert flipped.target_audio is batch.target_audio and torch.equal(flipped.kind, batch.kind)
    assert flip_own_audio(batch, 0.0, torch.Generator())[0] is batch
    a, na = flip_own_audio(batch, 0.3, torch.Generator().manual_seed(5))
    b, nb = flip_own_audio(batch, 0.3, torch.Generator().manual_seed(5))
    assert na == nb and 0 < na < 9 and torch.equal(a.audio_bins, b.audio_bins)


def test_decoded_own_audio_by_hand_and_as_the_floor_target():
    """Own audio shaped like the floor decoder's output. By hand (micro-turn = [user audio][model audio x3]):
    speech pattern 1 0 1 -> the silent middle takes the first position's bins; 0 0 1 -> all silent (less than half
    speaks, and speech does not start there); 0 1 1 -> the leading silence takes the next position's bins. Then on random packed rows with silences:
    each micro-turn's own audio is all speech exactly where ``floor_targets`` (computed on the untouched batch) says
    the reference speaks, and nothing but own audio inputs changes."""
    from conftest import make_batch
    from tml.model.heads import SILENT_BIN, floor_targets
    from tml.streams.layout import Stream
    from tml.streams.modalities import Kind
    from tml.train.exposure import decoded_own_audio

    slots = [(Stream.USER, Kind.AUDIO, 1), (Stream.MODEL, Kind.AUDIO, 3)]
    batch = make_batch([[3]], L=12, vocab=10, slots=slots)
    own = (batch.stream == Stream.MODEL)[batch.kind == Kind.AUDIO]
    bins = batch.audio_bins.clamp_min(1)  # every position speaks ...
    pattern = [1, 0, 1, 0, 0, 1, 0, 1, 1]
    own_rows = own.nonzero().flatten()
    for r, spk in zip(own_rows.tolist(), pattern):
        if not spk:
            bins[r] = SILENT_BIN  # ... but these
    batch.audio_bins = bins
    row_of = ((batch.kind == Kind.AUDIO).flatten().cumsum(0) - 1).view(batch.shape)
    batch.target_audio = bins[row_of[:, 1:][(batch.target_kind == Kind.AUDIO)[:, :-1]]]  # the reference said it
    out, n = decoded_own_audio(batch)
    got = out.audio_bins[own_rows]
    assert n == 1 + 1 + 1  # one filled, one muted, one filled
    assert torch.equal(got[1], bins[own_rows[0]]) and torch.equal(got[0], bins[own_rows[0]])
    assert (got[3:6] == SILENT_BIN).all()
    assert torch.equal(got[6], bins[own_rows[7]]) and torch.equal(got[7:], bins[own_rows[7:]])
    assert torch.equal(out.audio_bins[~own], bins[~own]) and out.target_audio is batch.target_audio

    even = [(Stream.USER, Kind.AUDIO, 2), (Stream.MODEL, Kind.TEXT, 1), (Stream.MODEL, Kind.AUDIO, 4)]  # ties
    for slots in (None, even):
        batch = make_batch([[3, 2], [4]], L=100, vocab=50, seed=1, **({"slots": slots} if slots else {}))
        own = ((batch.kind == Kind.AUDIO) & (batch.stream == Stream.MODEL))[batch.kind == Kind.AUDIO]
        g = torch.Generator().manual_seed(0)
        silent = own & (torch.rand(own.shape, generator=g) < 0.5)
        batch.audio_bins[silent] = SILENT_BIN
        row_of = ((batch.kind == Kind.AUDIO).flatten().cumsum(0) - 1).view(batch.shape)
        batch.target_audio = batch.audio_bins[row_of[:, 1:][(batch.target_kind == Kind.AUDIO)[:, :-1]]]
        query, target = floor_targets(batch)
        out, _ = decoded_own_audio(batch)
        speaks = (out.audio_bins != SILENT_BIN).flatten(1).any(1)
        for (b, l), want in zip(query.nonzero().tolist(), target.tolist()):
            turn = (batch.stream[b] == Stream.MODEL) & (batch.kind[b] == Kind.AUDIO) & (batch.doc_ids[b] == batch.doc_ids[b, l]) \
                & (batch.micro_turn[b] == batch.micro_turn[b, l])
            assert speaks[row_of[b][turn]].tolist() == [bool(want)] * int(turn.sum())
        assert torch.equal(out.audio_bins[~own], batch.audio_bins[~own])
