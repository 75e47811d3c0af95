"""Real-format conversation corpora on disk (espeak speech in WAV files, transcripts in each layout) -> shards."""

import hashlib
import json

import pytest
import torch
import torchaudio
import webdataset as wds

from conftest import conversation, make_loader
from data_prep.ingest_conversations import ingest, main
from tml.audio.wav import write_wav
from tml.streams.episode import Episode


def episodes_of(out):
    m = json.loads((out / "manifest.json").read_text())
    return m, [Episode.from_sample(s) for s in wds.WebDataset([str(out / s["name"]) for s in m["shards"]],
                                                                shardshuffle=False)]


def moshi_corpus(root, voices):
    root.mkdir()
    x, al = conversation(voices)
    write_wav(root / "c1.wav", x, 24000)
    (root / "c1.json").write_text(json.dumps({"alignments": al}))
    write_wav(root / "mono.wav", x[0], 24000)  # bad: one channel
    (root / "mono.json").write_text(json.dumps({"alignments": al}))
    write_wav(root / "notext.wav", x, 24000)  # bad: no transcript beside it
    (root / "c2.wav").write_bytes(b"RIFF garbage")  # bad: unreadable
    (root / "c2.json").write_text("{}")
    lines = [{"path": n, "duration": 3.0} for n in ("c1.wav", "mono.wav", "notext.wav", "c2.wav")]
    (root / "train.jsonl").write_text("\n".join(json.dumps(d) for d in lines) + "\n")
    return x, al


def test_moshi_layout_to_shards_and_loader(tmp_path, voices):
    x, al = moshi_corpus(tmp_path / "corpus", voices)
    out = tmp_path / "out"
    m = main(["--format", "moshi", "--src", str(tmp_path / "corpus" / "train.jsonl"), "--out", str(out),
              "--license", "CC-BY-4.0", "--vocab-size", "300"])
    assert m["episodes"] == 1 and m["skipped"]["count"] == 3
    assert m["skipped"]["by_reason"] == {"wrong_channels": 1, "missing_transcript": 1, "unreadable_audio": 1}
    assert any("mono.wav" in s["message"] for s in m["skipped"]["inputs"])
    assert m["sources"] == {"moshi:train.jsonl": {"license": "CC-BY-4.0", "episodes": 1, "hours": round(3 / 3600, 6)}}
    for s in m["shards"]:
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert m["hours_per_stream"]["audio"] == {"model": round(3 / 3600, 6), "user": round(3 / 3600, 6)}
    _, (ep,) = episodes_of(out)
    want = {"model": [w[0] for w in al if w[2] == "SPEAKER_MAIN"], "user": [w[0] for w in al if w[2] != "SPEAKER_MAIN"]}
    assert {s: [w.text for w in ws] for s, ws in ep.words.items()} == want
    ref = torchaudio.functional.resample(x, 24000, 16000)  # independent resampling of the left (model) channel
    assert (ep.audio["model"] - ref[0]).abs().max() < 2 / 32768 + 1e-6
    assert (ep.audio["user"] - ref[1]).abs().max() < 2 / 32768 + 1e-6
    loader = make_loader(out, seq_len=100, mbs=1)
    assert next(loader).validate() and loader.stats()["data/bad_samples"] == 0


def test_moshi_model_speaker_other_swaps_sides(tmp_path, voices):
    moshi_corpus(tmp_path / "corpus", voices)
    ingest("moshi", tmp_path / "corpus" / "train.jsonl", tmp_path / "out", model_speaker="other", log=lambda s: None)
    _, (ep,) = episodes_of(tmp_path / "out")
    assert [w.text for w in ep.words["model"]] == ["fine", "thanks"]
    assert ep.audio["model"][: round(1.5 * 16000)].abs().max() < 1e-4  # the right side starts speaking at 1.6 s


def test_fisher_layout_stereo_and_two_mono_files(tmp_path, voices):
    src = tmp_path / "fisher"
    src.mkdir()
    x, _ = conversation(voices)
    x8 = torchaudio.functional.resample(x, 24000, 8000)  # telephone rate
    write_wav(src / "fe_001.wav", x8, 8000)
    (src / "fe_001.txt").write_text("# fe_001\n\n0.20 1.40 A: hello there, how are you?\n1.60 2.40 B: fine thanks\n")
    write_wav(src / "fe_002.A.wav", x8[0], 8000)
    write_wav(src / "fe_002.B.wav", x8[1], 8000)
    (src / "fe_002.txt").write_text("0.20 1.40 A: hello there, how are you?\n1.60 2.40 B: fine thanks\n")
    (src / "fe_003.txt").write_text("1.0 0.5 A: backwards\n")  # bad: no audio (named) ...
    write_wav(src / "fe_004.wav", x8, 8000)
    (src / "fe_004.txt").write_text("0.5 0.2 A: backwards\n")  # ... and mis-timed
    m = ingest("fisher", src, tmp_path / "out", model_speaker="B", chunk_s=1.0, log=lambda s: None)
    assert m["skipped"]["by_reason"] == {"missing_audio": 1}
    assert m["skipped_words"]["by_reason"] == {"mistimed_word": 1}  # fe_004's backwards word, not the recording
    _, eps = episodes_of(tmp_path / "out")
    keys = sorted(e.key for e in eps)
    assert keys == [f"fe_00{c}_{k:04d}" for c in (1, 2, 4) for k in range(3)]  # 3.0 s in chunks of 1.0 s
    by = {e.key: e for e in eps}
    # B (the model) says "fine thanks" over 1.6-2.4 s: spread by length+1 (5:7), "fine" 1.6-1.933, "thanks"
    # 1.933-2.4; both start in chunk 1 (1-2 s), "thanks" is clipped at the chunk end; chunk 2 has no model words.
    got = [(w.text, w.start, w.end) for w in by["fe_001_0001"].words["model"]]
    assert got == [("fine", pytest.approx(0.6, abs=1e-3), pytest.approx(0.6 + 0.8 * 5 / 12, abs=1e-3)),
                   ("thanks", pytest.approx(0.6 + 0.8 * 5 / 12, abs=1e-3), pytest.approx(1.0, abs=1e-3))]
    assert by["fe_001_0002"].words["model"] == []
    user = [w for k in range(3) for w in by[f"fe_001_{k:04d}"].words["user"]]
    assert [w.text for w in user] == ["hello", "there,", "how", "are", "you?"]
    for k in range(3):
        assert torch.equal(by[f"fe_001_{k:04d}"].audio["user"], by[f"fe_002_{k:04d}"].audio["user"])


def test_simple_json_layout(tmp_path, voices):
    src = tmp_path / "j"
    src.mkdir()
    x, al = conversation(voices)
    write_wav(src / "m.wav", x[0], 24000)
    write_wav(src / "u.wav", x[1], 24000)
    (src / "talk.json").write_text(json.dumps({
        "audio": {"model": "m.wav", "user": "u.wav"}, "license": "CC0", "source": "my-lab",
        "segments": [{"speaker": "model", "start": 0.2, "end": 1.4, "text": "hello there, how are you?",
                      "words": [[w[0], *w[1]] for w in al if w[2] == "SPEAKER_MAIN"]},
                     {"speaker": "user", "start": 1.6, "end": 2.4, "text": "fine thanks"}]}))
    (src / "broken.json").write_text(json.dumps({"audio": "m.wav", "segments": [{"speaker": "robot"}]}))
    m = ingest("json", src, tmp_path / "out", log=lambda s: None)
    assert m["sources"]["my-lab"]["license"] == "CC0" and m["skipped"]["by_reason"] == {"wrong_channels": 1}
    _, (ep,) = episodes_of(tmp_path / "out")
    assert [(w.text, w.start) for w in ep.words["model"]][0] == ("hello", al[0][1][0])
    assert ep.words["user"][0].start == pytest.approx(1.6) and ep.words["user"][-1].end == pytest.approx(2.4)


def test_hf_save_to_disk_and_audiofolder(tmp_path, voices):
    import datasets

    x, al = conversation(voices)
    write_wav(tmp_path / "c1.wav", x, 24000)
    ds = datasets.Dataset.from_dict({"audio": [str(tmp_path / "c1.wav")], "alignments": [json.dumps(al)]})
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    ds.save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "folder"
    folder.mkdir()
    write_wav(folder / "c1.wav", x, 24000)
    rows = [{"word": w, "start": a, "end": b, "speaker": spk} for w, (a, b), spk in al]
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "c1.wav", "alignments": rows}) + "\n")
    for src in (tmp_path / "saved", folder):
        out = tmp_path / f"out_{src.name}"
        m = ingest("hf", src, out, log=lambda s: None)
        assert m["episodes"] == 1 and m["skipped"]["count"] == 0
        _, (ep,) = episodes_of(out)
        assert [w.text for w in ep.words["user"]] == ["fine", "thanks"]
        assert ep.audio["user"][: round(1.5 * 16000)].abs().max() < 1e-4


def test_moshi_bad_words_are_dropped_one_by_one_and_spaces_stripped(tmp_path, voices):
    """whisper-timestamped keeps a leading space on words; one empty or mis-timed word must not cost the recording."""
    root = tmp_path / "corpus"
    root.mkdir()
    x, al = conversation(voices)
    spaced = [[" " + w, t, spk] for w, t, spk in al]
    bad = spaced + [["", [1.0, 1.1], "SPEAKER_MAIN"], [" late", [9.0, 9.5], "SPEAKER_OTHER"],
                    [" backwards", [2.0, 1.5], "SPEAKER_MAIN"]]
    write_wav(root / "c1.wav", x, 24000)
    (root / "c1.json").write_text(json.dumps({"alignments": bad}))
    (root / "train.jsonl").write_text(json.dumps({"path": "c1.wav", "duration": 3.0}) + "\n")
    m = ingest("moshi", root / "train.jsonl", tmp_path / "out", vocab_size=300, log=lambda s: None)
    assert m["episodes"] == 1 and m["skipped"]["count"] == 0
    assert m["skipped_words"]["by_reason"] == {"empty_word": 1, "mistimed_word": 2}
    assert all(w["input"] == "c1" for w in m["skipped_words"]["words"])
    assert any("' backwards'" in w["message"] for w in m["skipped_words"]["words"])
    _, (ep,) = episodes_of(tmp_path / "out")
    assert [w.text for w in ep.words["model"]] == [w for w, _, spk in al if spk == "SPEAKER_MAIN"]
    assert [w.text for w in ep.words["user"]] == ["fine", "thanks"]


def test_a_non_empty_out_is_refused_unless_overwrite(tmp_path, voices, capsys):
    moshi_corpus(tmp_path / "corpus", voices)
    src, out = tmp_path / "corpus" / "train.jsonl", tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["--format", "moshi", "--src", str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err
    assert not (out / "manifest.json").exists()
    main(["--format", "moshi", "--src", str(src), "--out", str(out), "--overwrite", "--vocab-size", "300"])
    assert (out / "manifest.json").exists() and (out / "notes.txt").read_text() == "mine"


def test_help_documents_every_layout(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for needle in ("{\"path\", \"duration\"}", "SPEAKER_MAIN", "leading space", "START END A: text",
                   "\"segments\"", "metadata.jsonl", "save_to_disk", "--overwrite"):
        assert needle in text, needle
