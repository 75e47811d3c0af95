"""Small defects found by a new user: plots that hide what they show, tables without a header, broken characters."""

import subprocess

from conftest import ROOT
from tml.eval.evaluate import plot_latencies
from tml.text.tokenizer import train_bpe
from tml.tools.plan import main as plan_main
from tml.tools.plot import throughput_figure


def test_empty_latency_histograms_say_no_data(tmp_path):
    fig = plot_latencies(tmp_path / "latencies.png", [{"latency": [], "stop_latency": [0.3]}])
    notes = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    assert notes[0] and "no data" in notes[0][0] and notes[1] == []
    assert (tmp_path / "latencies.png").stat().st_size > 0


def test_mfu_axis_label_is_inside_the_figure():
    fig = throughput_figure([{"step": s, "tokens_per_s": 1000.0 + s, "mfu": 0.3} for s in range(1, 6)])
    fig.canvas.draw()
    label = fig.axes[1].yaxis.label
    assert label.get_text() == "MFU (dashed)"
    assert label.get_window_extent(fig.canvas.get_renderer()).x1 <= fig.bbox.x1


def test_plan_states_its_assumptions_and_the_search_table_has_a_header(capsys):
    plan_main(["model=tiny", "cluster.gpus=8", "cluster.gpu=h100", "--search"])
    out = capsys.readouterr().out
    assert "assumed per GPU: peak 989 TFLOP/s bf16, HBM 3.35 TB/s, NVLink 450 GB/s, network 50 GB/s" in out
    header = next(line for line in out.splitlines() if "ZeRO" in line and "GiB/GPU" in line)
    assert header.split() == ["EP", "ZeRO", "act.", "ckpt", "GiB/GPU", "step", "s", "MFU"]


def test_a_character_split_over_micro_turns_is_written_whole(tmp_path):
    tok = train_bpe(["the cafe is open", "a naive idea"] * 3, 300, tmp_path / "tokenizer.json")
    ids = tok.encode("café")  # "é" is not in the corpus: its two bytes stay two tokens
    # a split inside the bytes of "é": decoding the halves on their own gives U+FFFD
    cut = next(k for k in range(1, len(ids)) if tok.tok.decode(ids[:k]).endswith("\ufffd"))
    turns = [ids[:cut], ids[cut:], []]
    assert "\ufffd" in tok.decode(ids[:cut]) + tok.decode(ids[cut:])
    pieces = tok.decode_turns(turns)
    assert "".join(pieces) == tok.decode(ids) == "café" and "\ufffd" not in "".join(pieces)
    assert pieces[1].endswith("é") and pieces[2] == ""


def test_the_readme_example_data_set_is_git_ignored():
    proc = subprocess.run(["git", "check-ignore", "data/my_set/manifest.json", "data/synthetic_tiny/x.tar"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.stdout.split() == ["data/my_set/manifest.json", "data/synthetic_tiny/x.tar"]
