"""Fixtures and helpers shared by the tests: import helpers from here (``from conftest import make_batch``), never
from another test module. Every test starts from the same seeds (``_seeded``), so a failure replays exactly."""

import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

from tml.audio.dmel import DMelTokenizer  # noqa: E402  (after DS_ACCELERATOR is set)
from tml.data.loader import LoaderConfig, PackedBatchLoader  # noqa: E402
from tml.model import ModelConfig, MoEConfig  # noqa: E402
from tml.streams.batch import IGNORE_INDEX, Batch  # noqa: E402
from tml.streams.layout import LayoutConfig, MicroTurnLayout, Stream  # noqa: E402
from tml.streams.modalities import Kind  # noqa: E402
from tml.text.tokenizer import TextTokenizer  # noqa: E402
from tml.train.checkpoint import tag_for  # noqa: E402
from tml.train.metrics import read_metrics  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Seed Python's, NumPy's and torch's global generators before every test, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A small real synthetic data set (espeak-ng speech, video, BPE), made once per test session."""
    out = tmp_path_factory.mktemp("synth") / "data"
    subprocess.run([sys.executable, "-m", "data_prep.synth_dialogues", "--out", str(out), "--episodes", "12",
                    "--seed", "3", "--shard-size", "3"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real pretrain run of a tiny model (1 layer, dim 64, 2 steps on hand-made data), trained once per test session:
    the checkpoint the evaluate, converse and serve tests load."""
    from handmade import write_dataset

    root = tmp_path_factory.mktemp("tiny_run")
    data = write_dataset(root / "data", 4, 2)
    run = root / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "recipes/pretrain.py", f"data.path={data}", f"hydra.run.dir={run}",
                    "trainer.max_steps=2", "logger=none", "model.dim=64", "model.n_layers=1", "model.moe.hidden_dim=64",
                    "model.moe.num_experts=4", "data.loader.seq_len=200"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    return run


# --- hand-built model batches (the tiny layout) ---

S, C, NB, P = 4, 80, 16, 40
# The tiny layout: [user audio x5][video patch x4][background text x2] -> [model text x4][model audio x5]
SLOTS = [(Stream.USER, Kind.AUDIO, 5), (Stream.VIDEO, Kind.PATCH, 4), (Stream.BACKGROUND, Kind.TEXT, 2),
         (Stream.MODEL, Kind.TEXT, 4), (Stream.MODEL, Kind.AUDIO, 5)]
TURN = sum(c for _, _, c in SLOTS)


def make_batch(rows: list[list[int]], L: int, vocab: int, seed: int = 0, empty_text: float = 0.3,
               slots: list[tuple[Stream, Kind, int]] = SLOTS) -> Batch:
    """Pack documents of the given micro-turn counts into rows of length L, with random payloads; one micro-turn
    is ``slots``, text slots are empty (PAD) with probability ``empty_text``. Targets follow the contract: position
    i predicts position i+1 when that is a MODEL TEXT/AUDIO position of the same document."""
    g = torch.Generator().manual_seed(seed)
    B = len(rows)
    kind = torch.zeros(B, L, dtype=torch.long)
    stream, turn, pos, text = kind.clone(), kind.clone(), kind.clone(), kind.clone()
    doc = torch.full((B, L), -1)
    rc = []
    for b, docs in enumerate(rows):
        at = 0
        for d, n_turns in enumerate(docs):
            start = at
            for t in range(n_turns):
                for s, k, count in slots:
                    for j in range(count):
                        empty = k == Kind.TEXT and torch.rand((), generator=g) < empty_text
                        kind[b, at] = Kind.PAD if empty else k
                        stream[b, at], turn[b, at], doc[b, at], pos[b, at] = s, t, d, at - start
                        if kind[b, at] == Kind.TEXT:
                            text[b, at] = torch.randint(1, vocab, (), generator=g)
                        if k == Kind.PATCH:
                            rc.append((j // 2, j % 2))
                        at += 1
            assert at <= L, "documents do not fit in the row"
    n_audio, n_patch = int((kind == Kind.AUDIO).sum()), int((kind == Kind.PATCH).sum())
    audio = torch.randint(0, NB, (n_audio, S, C), generator=g)
    patches = torch.randint(0, 256, (n_patch, P, P, 3), generator=g).to(torch.uint8)

    nxt_ok = ((stream[:, 1:] == Stream.MODEL) & ((kind[:, 1:] == Kind.TEXT) | (kind[:, 1:] == Kind.AUDIO))
              & (doc[:, 1:] == doc[:, :-1]) & (doc[:, :-1] >= 0))
    target_kind = torch.zeros(B, L, dtype=torch.long)
    target_kind[:, :-1] = torch.where(nxt_ok, kind[:, 1:], Kind.PAD)
    target_text = torch.full((B, L), IGNORE_INDEX)
    target_text[:, :-1] = torch.where(target_kind[:, :-1] == Kind.TEXT, text[:, 1:], IGNORE_INDEX)
    # row of audio_bins for each position (row-major), then the one of position i + 1 for each audio target
    audio_row = ((kind == Kind.AUDIO).flatten().cumsum(0) - 1).view(B, L)
    target_audio = audio[audio_row[:, 1:][target_kind[:, :-1] == Kind.AUDIO]]
    return Batch(kind=kind, stream=stream, micro_turn=turn, position_ids=pos, doc_ids=doc, target_kind=target_kind,
                 payload=dict(text_ids=text, audio_bins=audio, patches=patches,
                              patch_rc=torch.tensor(rc, dtype=torch.long).view(-1, 2), target_text=target_text,
                              target_audio=target_audio)).validate()


def tiny_cfg(**overrides) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, dense_layers=1, dense_hidden_dim=128,
                moe=MoEConfig(hidden_dim=64, num_experts=4, top_k=2))
    return ModelConfig(**{**base, **overrides})


# --- the pretraining recipe, run as a user runs it ---

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.moe.hidden_dim=64",
        "model.moe.num_experts=4", "data.loader.seq_len=200", "data.loader.micro_batch_size=2",
        "trainer.warmup_steps=2", "trainer.decay_steps=16", "trainer.lr=3e-3", "logger.console_every=1"]


ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}  # the environment every recipe run gets
# The logged values two runs that must agree are compared on (resume, other world sizes, requeue, faults).
COMPARED = ("loss", "loss/text", "loss/audio", "loss/aux", "lr", "grad_norm")


def recipe_cmd(run_dir, overrides, nproc=1) -> list[str]:
    """The pretraining recipe's command line with the TINY model: one process, or torchrun with ``nproc`` ranks."""
    # --standalone: a free rendezvous port (other test sessions on this machine may hold torchrun's default 29500)
    cmd = [sys.executable, "recipes/pretrain.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "recipes/pretrain.py"]
    return [*cmd, *TINY, f"hydra.run.dir={run_dir}", *overrides]


def run_recipe(run_dir, *overrides, nproc=1, timeout=600):
    """Run the recipe to its end; a failure raises with the output's tail."""
    proc = subprocess.run(recipe_cmd(run_dir, overrides, nproc), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"recipe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start(run_dir, *overrides, nproc=1) -> subprocess.Popen:
    """Start the recipe in its own session (so a test can signal the whole process group); output on stdout."""
    return subprocess.Popen(recipe_cmd(run_dir, overrides, nproc), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(proc, run_dir, step, timeout=300):
    """Block until metrics.jsonl holds ``step`` records (the process must still be running)."""
    path, t_end = Path(run_dir) / "metrics.jsonl", time.time() + timeout
    while time.time() < t_end:
        if path.exists() and len(path.read_text().splitlines()) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended ({proc.returncode}) before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def module_state(run_dir, step) -> dict:
    """Rank 0's saved model state dict at ``step``."""
    f = Path(run_dir) / "checkpoints" / tag_for(step) / "mp_rank_00_model_states.pt"
    return torch.load(f, weights_only=False)["module"]


def assert_same_params(a: dict, b: dict):
    """Bitwise equality of two state dicts."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def metrics(run_dir):
    """The run's metrics.jsonl records."""
    return read_metrics(run_dir)


# --- the packed-batch loader on a hand-made data set ---

def make_loader(path, rank=0, world=1, workers=0, seq_len=100, mbs=2, **kw):
    return PackedBatchLoader(path, LoaderConfig(seq_len=seq_len, micro_batch_size=mbs, seed=7, num_workers=workers,
                                                **kw),
                             MicroTurnLayout(LayoutConfig()), DMelTokenizer(),
                             TextTokenizer.load(path / "tokenizer.json"), rank=rank, world_size=world)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-host Slurm cluster (munged + slurmctld + slurmd, one node with 2 CPUs), shared by the session."""
    from slurm_cluster import Cluster, missing_binaries

    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}): as root, "
                    f"apt-get install -y slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs slurmd, which starts jobs, as root: run the tests as root")
    cluster = Cluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


# The run the cluster and fault tests compare with (tests/test_slurm.py, tests/test_faults.py): tiny model, 2 ranks.
CLUSTER_STEPS = 24
CLUSTER_RUN = [f"trainer.max_steps={CLUSTER_STEPS}", "trainer.save_every=8", "logger=none",
               "logger.progress_bar=false"]


@pytest.fixture(scope="session")
def two_rank_run(synth_data, tmp_path_factory) -> Path:
    """CLUSTER_RUN uninterrupted through torchrun on this machine, 2 ranks: the reference for interrupted runs."""
    run = tmp_path_factory.mktemp("two_rank_run") / "run"
    run_recipe(run, f"data.path={synth_data}", *CLUSTER_RUN, nproc=2)
    return run


# --- one streaming case: a tiny untrained model and one short episode (tests/test_streaming.py, tests/test_floor.py) ---

STREAM_TURNS = 12  # micro-turns of the streaming episode


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, layout, dmel, text tokenizer, episode, the episode's training tokens): a tiny untrained model in eval
    mode and a 2.4 s episode with user speech, model noise and words, video and one background result."""
    from tml.model import InteractionModel
    from tml.streams import BackgroundEvent, Episode, Word
    from tml.streams.interleave import interleave
    from tml.text.tokenizer import train_bpe

    torch.manual_seed(0)
    sr, turns = 16000, STREAM_TURNS
    words = "hello there how are you fine thanks result forty two let me check".split()
    text = train_bpe([" ".join(words)] * 20, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")
    g = torch.Generator().manual_seed(1)
    n = int(turns * 0.2 * sr)
    t = torch.arange(n) / sr
    episode = Episode(
        key="ep", duration=turns * 0.2, sample_rate=sr,
        audio={"user": 0.3 * torch.sin(2 * math.pi * 300 * t) * (t < 1.0), "model": 0.05 * torch.randn(n, generator=g)},
        words={"user": [Word("hello", 0.1, 0.4)], "model": [Word("fine", 1.1, 1.3), Word("thanks", 1.35, 1.6),
                                                              Word("result", 1.7, 1.9)]},
        video=torch.randint(0, 256, (turns, 80, 80, 3), generator=g, dtype=torch.uint8), video_fps=5.0,
        background=[BackgroundEvent(0.9, "result forty two")],
    )
    layout = MicroTurnLayout(LayoutConfig(video_stride=2))
    model = InteractionModel(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=text.vocab_size,
                                         moe=MoEConfig(hidden_dim=64, num_experts=4, top_k=2))).eval()
    dmel = DMelTokenizer()
    tok = interleave(episode, layout, dmel, text)
    return model, layout, dmel, text, episode, tok


def turn_inputs(tok, layout, episode, t):
    """The inputs of micro-turn t as a live stream would deliver them (payloads taken from the training tokens), and
    the model's own text ids and audio bins of that micro-turn."""
    from tml.eval.generate import turn_outputs
    from tml.eval.session import MicroTurnInputs

    n = layout.length
    sl = slice(t * n, (t + 1) * n)
    kind, stream, ids = tok.kind[sl], tok.stream[sl], tok.text_ids[sl]
    audio_idx = torch.cumsum(tok.kind == Kind.AUDIO, 0) - 1
    user = audio_idx[sl][(kind == Kind.AUDIO) & (stream == Stream.USER)]
    bg = [int(i) for i in ids[stream == Stream.BACKGROUND] if i != 0]
    return (MicroTurnInputs(user_audio=tok.audio_bins[user].reshape(-1, 80), video_frame=episode.video[t],
                            background_text=bg),
            turn_outputs(tok, layout, t))


# --- recorded-conversation material: espeak speech at 24 kHz (tests/test_ingest.py, tests/test_word_events.py) ---

@pytest.fixture(scope="module")
def voices():
    """Two utterances, 24 kHz (moshi's rate), with their espeak word times."""
    import torchaudio

    from tml.data.espeak import speak

    a, wa = speak("hello there, how are you?", "en-us", 170, 50)
    b, wb = speak("fine thanks", "en+f3", 170, 60)
    up = lambda x: torchaudio.functional.resample(x, 16000, 24000)  # noqa: E731
    return (up(a), wa), (up(b), wb)


def conversation(voices, dur=3.0, sr=24000):
    """Left (model) says sentence A at 0.2 s, right (user) says B at 1.6 s; returns the stereo wave and alignments."""
    (a, wa), (b, wb) = voices
    x = torch.zeros(2, round(dur * sr))
    x[0, round(0.2 * sr): round(0.2 * sr) + a.numel()] = a[: x.shape[1] - round(0.2 * sr)]
    x[1, round(1.6 * sr): round(1.6 * sr) + b.numel()] = b[: x.shape[1] - round(1.6 * sr)]
    al = [[w.text, [round(0.2 + w.start, 3), round(0.2 + w.end, 3)], "SPEAKER_MAIN"] for w in wa] + \
        [[w.text, [round(1.6 + w.start, 3), round(1.6 + w.end, 3)], "SPEAKER_OTHER"] for w in wb]
    return x, al


# --- a scratch copy of tml with edits: what adding a modality or a head touches ---

def run_in_scratch(tmp_path, edits: dict, script: str, timeout: int = 600) -> set[str]:
    """Copy ``tml`` to ``tmp_path``, apply ``edits`` (path -> new text from the old, "" for a new file), run
    ``script`` with the copy first on the path (within ``timeout`` seconds); returns the files that differ from the
    repository's."""
    tml = tmp_path / "tml"
    shutil.copytree(ROOT / "tml", tml, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, edit in edits.items():
        path = tmp_path / rel
        path.write_text(edit(path.read_text() if path.exists() else ""))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return {str(p.relative_to(tmp_path)) for p in tml.rglob("*.py")
            if not (ROOT / p.relative_to(tmp_path)).exists()
            or p.read_text() != (ROOT / p.relative_to(tmp_path)).read_text()}
