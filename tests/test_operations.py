"""Operations, run for real on local processes: SIGKILL + resume (bitwise), a kill inside a checkpoint save,
damaged checkpoints, SIGUSR1/SIGTERM stops, resume on another number of ranks, the non-finite guard, the Slurm
scripts (bash -n, shellcheck, the per-node wrapper run by hand), a submitit sweep, and the tools (plot, export,
model card, manifest)."""

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENV, ROOT, TINY, assert_same_params, metrics, module_state, run_recipe, start, wait_for_step
from tml.audio.wav import read_wav
from tml.model import ModelConfig
from tml.model.flops import active_matmul_params, flops_per_token
from tml.train.checkpoint import (CheckpointError, damage, prune_checkpoints, resharded_loader_state, tag_for,
                                  universal_resume_tag)
from tml.train.optim import warmup_cosine
from tml.train.signals import EXIT_STOPPED_BY_SIGNAL, REPEAT_WINDOW_S

LONG = ["trainer.max_steps=400", "trainer.save_every=1000", "logger=none"]  # runs until signalled


# ----------------------------------------------------------------------------------------------- units


def test_flops_per_token_by_hand():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300)
    cfg.moe.hidden_dim, cfg.moe.num_experts, cfg.moe.top_k = 64, 4, 2
    per_layer = (2 * 64 * 64 + 2 * 32 * 64) + 2 * 64 + 4 * 64 + 2 * 3 * 64 * 64  # attn, 2 norms, router, top-2 experts
    stem = 16 * 3 * 10 * 10 + 16 * 16 * 2 * 2 + 64 * 16 * 2 * 2  # hMLP conv weights (10 -> 2 -> 2)
    heads = 64 * 300 + 64 * 4 * 80 * 16 + (64 + 1)  # text, dMel, floor (counted per token, as the others)
    want = 2 * per_layer + 64 + stem + heads  # + final norm; embedding tables are lookups, not matmuls
    assert active_matmul_params(cfg) == want
    assert flops_per_token(cfg, 200) == 6 * want + 12 * 2 * 64 * 200


def test_prune_keeps_last_n_and_every_k(tmp_path):
    for s in range(1, 11):
        (tmp_path / tag_for(s)).mkdir()
    (tmp_path / (tag_for(3) + "_universal")).mkdir()  # a conversion goes with its source
    (tmp_path / "latest").write_text(tag_for(10))
    prune_checkpoints(tmp_path, keep_last=2, keep_every=4)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [tag_for(s) for s in (4, 8, 9, 10)]


def test_universal_resume_only_for_zero_partitions_from_another_world_size(tmp_path):
    (tmp_path / tag_for(8)).mkdir()
    (tmp_path / tag_for(8) / "complete.json").write_text(json.dumps({"step": 8, "world_size": 2, "files": {}}))
    (tmp_path / "latest").write_text(tag_for(8))
    assert universal_resume_tag(tmp_path, world_size=1, zero_stage=2, expert_parallel_size=1) == tag_for(8)
    assert universal_resume_tag(tmp_path, world_size=2, zero_stage=2, expert_parallel_size=1) is None  # same size
    assert universal_resume_tag(tmp_path, world_size=1, zero_stage=0, expert_parallel_size=1) is None  # whole state
    with pytest.raises(CheckpointError, match="parallel.expert_parallel_size=2"):
        universal_resume_tag(tmp_path, world_size=4, zero_stage=1, expert_parallel_size=2)
    # Written with AutoEP at EP 2: experts move only to AutoEP at ZeRO 3, also at the same world size.
    (tmp_path / tag_for(8) / "complete.json").write_text(json.dumps(
        {"step": 8, "world_size": 2, "files": {}, "expert_parallel": {"size": 2, "backend": "deepspeed"}}))
    assert universal_resume_tag(tmp_path, 4, 3, expert_parallel_size=4, moe_backend="deepspeed") == tag_for(8)
    assert universal_resume_tag(tmp_path, 2, 3, expert_parallel_size=2, moe_backend="deepspeed") is None
    assert universal_resume_tag(tmp_path, 4, 3, expert_parallel_size=2, moe_backend="deepspeed") == tag_for(8)
    for world, zero, ep, backend in ((1, 3, 1, "native"), (4, 2, 4, "deepspeed"), (4, 3, 4, "native")):
        with pytest.raises(CheckpointError, match="moe_backend=deepspeed at parallel.zero_stage=3"):
            universal_resume_tag(tmp_path, world, zero, expert_parallel_size=ep, moe_backend=backend)


def test_resharded_loader_state_starts_the_next_epoch():
    old = [{"workers": [[1, 3, 2], [2, 0, 0]]}, {"workers": [[2, 0, 1], [1, 5, 0]]}]
    assert resharded_loader_state(old) == {"restart_epoch": 3}


# ------------------------------------------------------------------------- SIGKILL at a random step, resume


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_at_random_step_then_resume_is_bitwise(synth_data, tmp_path, nproc):
    common = [f"data.path={synth_data}", "trainer.max_steps=8", "trainer.save_every=2", "logger=none"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_recipe(straight, *common, nproc=nproc)
    kill_at = random.randint(3, 7)
    proc = start(killed, *common, nproc=nproc)
    wait_for_step(proc, killed, kill_at)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process tree, as a node failure would
    proc.wait()
    assert (killed / "checkpoints" / "latest").exists()
    out = run_recipe(killed, *common, "trainer.auto_resume=true", nproc=nproc).stdout
    assert "resumed from" in out, f"killed at step {kill_at}"
    assert_same_params(module_state(straight, 8), module_state(killed, 8))
    assert [r["loss"] for r in metrics(straight)] == [r["loss"] for r in metrics(killed)]


# ---------------------------------------------- kill inside a save, damaged checkpoints, non-finite guard


@pytest.mark.parametrize("zero", [0, 2])
def test_nan_gradients_with_finite_loss_skip_the_step(synth_data, tmp_path, zero):
    """Step 2's gradients are NaN while its loss is finite. ZeRO 0: our check of the whole gradients; ZeRO 2: the
    gradients are partitioned and DeepSpeed's optimizer skips the step itself. Either way the step is counted as
    skipped, the schedule does not advance, and no NaN reaches the weights (every later loss is finite)."""
    run_recipe(tmp_path, f"data.path={synth_data}", "logger=none", "trainer.max_steps=4", "trainer.save_every=100",
               f"parallel.zero_stage={zero}", "trainer.fault.nan_grad_at_step=2")
    m = metrics(tmp_path)
    assert [r["nonfinite_skipped"] for r in m] == [0, 1, 1, 1]
    assert math.isnan(m[1]["grad_norm"]) and math.isfinite(m[2]["grad_norm"])
    assert m[2]["lr"] == m[1]["lr"] and m[1]["lr"] > m[0]["lr"]
    assert all(math.isfinite(r["loss"]) for r in m)


def test_kill_in_save_damaged_checkpoint_and_nonfinite_guard(synth_data, tmp_path):
    run = tmp_path / "run"
    common = [f"data.path={synth_data}", "trainer.save_every=1", "trainer.keep_last=2", "logger=none"]
    # Step 2's loss is NaN (skipped, counted); the process dies while writing step 4's checkpoint.
    proc = subprocess.run([sys.executable, "recipes/pretrain.py", *TINY, f"hydra.run.dir={run}", *common,
                           "trainer.max_steps=6", "trainer.fault.nan_at_step=2",
                           "trainer.fault.kill_in_save_at_step=4"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr[-3000:]
    m = metrics(run)
    assert [r["nonfinite_skipped"] for r in m] == [0, 1, 1, 1]
    assert m[2]["lr"] == m[1]["lr"] and m[1]["lr"] > m[0]["lr"]  # the skipped step did not advance the schedule
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [tag_for(2), tag_for(3)]  # step 1 pruned, 4 unpublished
    assert (ckpts / "latest").read_text() == tag_for(3) and (ckpts / ".tmp" / tag_for(4)).exists()

    # Resume from the previous complete checkpoint; NaN at step 5 with a limit of 1 stops the run.
    proc = subprocess.run([sys.executable, "recipes/pretrain.py", *TINY, f"hydra.run.dir={run}", *common,
                           "trainer.max_steps=6", "trainer.auto_resume=true", "trainer.fault.nan_at_step=5",
                           "trainer.max_nonfinite_in_a_row=1"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert f"resumed from {ckpts / tag_for(3)}" in proc.stdout
    assert proc.returncode != 0 and "trainer.max_nonfinite_in_a_row=1" in proc.stderr
    assert "checkpoint of step 4" in proc.stderr and (ckpts / "latest").read_text() == tag_for(4)
    assert [r["nonfinite_skipped"] for r in metrics(run)] == [0, 1, 1, 1, 2]  # the count carried over the resume
    assert not (ckpts / ".tmp" / tag_for(4)).exists()

    # The newest checkpoint loses bytes: resume falls back to the previous one with a warning.
    states = ckpts / tag_for(4) / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    assert "bytes" in damage(ckpts / tag_for(4))
    proc = run_recipe(run, *common, "trainer.max_steps=5", "trainer.auto_resume=true")
    assert f"resumed from {ckpts / tag_for(3)}" in proc.stdout
    logged = proc.stdout + proc.stderr  # Hydra sends the log to stdout and pretrain.log
    assert f"{ckpts / tag_for(4)} is damaged" in logged and "falling back" in logged
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------ signals


def test_sigusr1_saves_and_exits_with_the_documented_code(synth_data, tmp_path):
    proc = start(tmp_path, f"data.path={synth_data}", *LONG)
    wait_for_step(proc, tmp_path, 2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED_BY_SIGNAL, out[-3000:]
    last = metrics(tmp_path)[-1]["step"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == tag_for(last) and damage(
        tmp_path / "checkpoints" / tag_for(last)) is None
    assert f"stopped by signal {int(signal.SIGUSR1)} at step {last}" in out


def test_second_signal_exits_at_once(synth_data, tmp_path):
    """A repeat within REPEAT_WINDOW_S is the same request (Slurm and torchrun deliver a stop twice); a signal after
    it exits at once. Every step sleeps 6 s (trainer.fault.slow_rank_s), so both arrive inside one step."""
    proc = start(tmp_path, f"data.path={synth_data}", *LONG, "trainer.fault.slow_rank_s=6")
    wait_for_step(proc, tmp_path, 1)
    proc.send_signal(signal.SIGTERM)
    for line in proc.stdout:  # signals of one kind arriving together count once: wait until the first is seen
        if "received SIGTERM" in line:
            break
    proc.send_signal(signal.SIGUSR1)  # within the window: ignored
    time.sleep(REPEAT_WINDOW_S + 0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # before the step and its save finish
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM


def test_two_ranks_stop_on_sigusr1_through_the_slurm_node_wrapper(synth_data, tmp_path):
    # launch/slurm_node.sh is what each Slurm node runs; here it runs by hand as a one-node job of 2 ranks.
    with socket.socket() as s:  # a free port for the c10d rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "SLURM_NNODES": "1", "SLURM_JOB_ID": "local", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "GPUS_PER_NODE": "2", "PY": sys.executable}
    proc = subprocess.Popen(["launch/slurm_node.sh", *TINY, f"hydra.run.dir={tmp_path}", f"data.path={synth_data}",
                             *LONG], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(proc, tmp_path, 2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0 and out.count("received SIGUSR1") == 2, out[-3000:]
    last = metrics(tmp_path)[-1]["step"]
    tag = tmp_path / "checkpoints" / tag_for(last)
    assert damage(tag) is None and (tag / "trainer_state_rank1.pt").exists()
    assert f"exitcode  : {EXIT_STOPPED_BY_SIGNAL}" in out  # torchrun's failure report names the trainers' code


# ------------------------------------------------------------------------------- another number of ranks


@pytest.mark.parametrize("nproc", [1, 4])
def test_two_rank_checkpoint_resumes_on_other_world_sizes(synth_data, tmp_path_factory, nproc):
    two = tmp_path_factory.getbasetemp() / "two_ranks_8_steps"
    common = [f"data.path={synth_data}", "trainer.save_every=8", "logger=none"]
    if not (two / "checkpoints" / tag_for(8) / "complete.json").exists():
        run_recipe(two, *common, "trainer.max_steps=8", nproc=2)
    run = tmp_path_factory.mktemp(f"on{nproc}") / "run"
    shutil.copytree(two, run)
    proc = run_recipe(run, *common, "trainer.max_steps=10", "trainer.resume=true", nproc=nproc)
    assert f"resumed from {run / 'checkpoints' / tag_for(8)} at step 8" in proc.stdout
    assert f"written by 2 ranks, resuming on {nproc}" in proc.stdout + proc.stderr
    m = metrics(run)
    assert [r["step"] for r in m] == list(range(1, 11))
    # The schedule continues (lr of step 9 is the 9th value of warmup+cosine) and the weights carried over
    # (the loss stays far below a fresh model's).
    assert m[8]["lr"] == pytest.approx(3e-3 * warmup_cosine(2, 16, 0.1)(8), rel=1e-12)
    assert m[8]["loss"] < 0.8 * m[0]["loss"]
    # Data: every new rank starts the epoch after the furthest the old ranks reached, from its first sample.
    assert m[8]["data/episodes_seen"] <= 2 * nproc


def test_zero2_checkpoint_resumes_on_one_rank_like_zero0(synth_data, tmp_path_factory):
    """ZeRO 2 partitions the optimizer per rank, so a 2-rank checkpoint resumed on 1 rank is converted to DeepSpeed's
    universal format first. Independent expectation: the same run at ZeRO 0, whose checkpoint holds the whole
    optimizer state and loads on 1 rank as it is. The resumed steps agree: step 9's loss checks the weights, step
    10's loss and both grad norms the Adam moments and the schedule."""
    base = tmp_path_factory.getbasetemp()
    common = [f"data.path={synth_data}", "trainer.save_every=8", "logger=none"]
    resumed = {}
    for zero, src in ((0, base / "two_ranks_8_steps"), (2, base / "two_ranks_8_steps_zero2")):  # ZeRO 0 run shared
        if not (src / "checkpoints" / tag_for(8) / "complete.json").exists():
            run_recipe(src, *common, f"parallel.zero_stage={zero}", "trainer.max_steps=8", nproc=2)
        run = tmp_path_factory.mktemp(f"zero{zero}_on1") / "run"
        shutil.copytree(src, run)
        proc = run_recipe(run, *common, f"parallel.zero_stage={zero}", "trainer.max_steps=10", "trainer.resume=true")
        assert f"resumed from {run / 'checkpoints' / tag_for(8)} at step 8" in proc.stdout
        converted = (run / "checkpoints" / (tag_for(8) + "_universal")).is_dir()
        assert converted == (zero == 2) and ("universal format" in proc.stdout + proc.stderr) == (zero == 2)
        resumed[zero] = metrics(run)
    for a, b in zip(resumed[0][8:], resumed[2][8:]):
        assert b["lr"] == a["lr"]
        for k in ("loss", "loss/text", "loss/audio", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (a["step"], k)


AUTOEP3 = ["parallel.zero_stage=3", "parallel.expert_parallel_size=2", "parallel.moe_backend=deepspeed"]


@pytest.mark.parametrize("name, parallel, nproc, ep, resumed_with", [
    ("zero1", ["parallel.zero_stage=1"], 1, 1, []),
    ("autoep_zero3", AUTOEP3, 4, 4, ["parallel.expert_parallel_size=4"]),  # experts 2 per rank -> 1 per rank
])
def test_state_resumed_on_another_world_size_is_the_state_that_was_saved(synth_data, tmp_path_factory, name,
                                                                         parallel, nproc, ep, resumed_with):
    """A 2-rank checkpoint loaded on ``nproc`` ranks (converted to the universal format) and on the 2 ranks that wrote
    it (no conversion): fp32 weights, both Adam moments and step, every param group's hyperparameters and the lr
    schedule are bitwise equal (tests/resume_state_worker.py resumes with the recipe's setup and gathers them). ZeRO 1
    2 -> 1 ranks; ZeRO 3 with AutoEP 2 -> 4 ranks and expert-parallel size 2 -> 4, each expert compared where it now
    lives. At ZeRO 3 this caught DeepSpeed giving every param group group 0's weight decay. The data loader restarts
    as documented."""
    src = tmp_path_factory.getbasetemp() / f"two_ranks_4_steps_{name}"
    if not (src / "checkpoints" / tag_for(4) / "complete.json").exists():
        run_recipe(src, f"data.path={synth_data}", "trainer.save_every=4", "logger=none", *parallel,
                   "trainer.max_steps=4", nproc=2)
    run = tmp_path_factory.mktemp(f"{name}_state") / "run"
    shutil.copytree(src, run)
    dumps = {}
    for n, overrides in ((2, []), (nproc, resumed_with)):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                        "tests/resume_state_worker.py", str(run), str(run / f"state_{n}"), *overrides], cwd=ROOT,
                       env=ENV, check=True, capture_output=True, timeout=600)
        dumps[n] = [torch.load(run / f"state_{n}.rank{r}.pt", weights_only=False) for r in range(n)]
    assert (run / "checkpoints" / (tag_for(4) + "_universal")).is_dir()
    saved, resumed = dumps[2][0], dumps[nproc][0]

    def full(dump: list[dict], ep_size: int, param: str, key: str) -> torch.Tensor:
        """A parameter's whole tensor: sharded experts concatenated over the expert-parallel group of rank 0."""
        if re.search(r"\.experts\.w[123]$", param):
            return torch.cat([dump[r]["params"][param][key] for r in range(ep_size)])
        return dump[0]["params"][param][key]

    assert saved["params"].keys() == resumed["params"].keys() and len(saved["params"]) > 30
    for param, st in saved["params"].items():
        for key in st:
            assert torch.equal(full(dumps[2], 2 if ep > 1 else 1, param, key), full(dumps[nproc], ep, param, key)), \
                (param, key)
    assert saved["adam_steps"] == resumed["adam_steps"] == [4.0]
    assert resumed["groups"] == saved["groups"] and [g["weight_decay"] for g in resumed["groups"]][:2] == [0.1, 0.0]
    assert resumed["scheduler"] == saved["scheduler"] and resumed["scheduler"]["last_epoch"] == 4
    assert resumed["step"] == 4
    written = [torch.load(run / "checkpoints" / tag_for(4) / f"trainer_state_rank{r}.pt", weights_only=False)["loader"]
               for r in range(2)]
    epoch = max(w[0] for s in written for w in s["workers"]) + 1  # the epoch after the furthest, from its start
    assert resumed["loader"]["workers"] == [[epoch, 0, 0]] and resumed["loader"]["world_size"] == nproc


# ------------------------------------------------------------------------------------ launch and sweeps


def test_slurm_scripts_parse_and_pass_shellcheck():
    scripts = sorted((ROOT / "launch").glob("*.s*"))
    assert {p.name for p in scripts} >= {"slurm_multinode.sbatch", "slurm_per_gpu.sbatch", "slurm_node.sh"}
    for p in scripts:
        subprocess.run(["bash", "-n", str(p)], check=True)
        text = p.read_text()
        if p.suffix == ".sbatch":
            assert "#SBATCH --signal=B:USR1@" in text and "scontrol requeue" in text, p
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck); bash -n passed")
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_submitit_local_sweep_runs_two_jobs(synth_data, tmp_path):
    proc = subprocess.run([sys.executable, "recipes/pretrain.py", "--multirun", "+launcher=local", *TINY,
                           f"data.path={synth_data}", "trainer.max_steps=2", "logger=none", "trainer.lr=1e-3,2e-3",
                           f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lrs = sorted(json.loads((tmp_path / j / "config.resolved.json").read_text())["trainer"]["lr"] for j in "01")
    assert lrs == [1e-3, 2e-3]
    assert all(len(metrics(tmp_path / j)) == 2 for j in "01")


# ------------------------------------------------------------------------------------------------- tools


def test_plot_tool_draws_loss_lr_throughput_and_expert_load(tmp_path):
    records = [{"step": s, "loss": 5.0 / s, "loss/text": 3.0 / s, "loss/audio": 2.0 / s, "lr": 1e-3,
                "tokens_per_s": 100.0 + s, "mfu": 0.1,
                **{f"moe/layer{i}/load": [0.4, 0.3, 0.2, 0.1] for i in range(3)},
                **{f"moe/layer{i}/max_over_mean": 1.6 for i in range(3)},
                "moe/switch_loss": 1.0 + 0.1 / s, "moe/z_loss": 4.0 / s} for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run([sys.executable, "-m", "tml.tools.plot", str(tmp_path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = {"loss", "lr", "throughput", "expert_load", "expert_load_time", "router"}
    assert {p.stem for p in (tmp_path / "plots").glob("*.png")} == names
    from matplotlib.image import imread

    heat = imread(tmp_path / "plots" / "expert_load.png")
    assert heat.shape[0] > 50 and heat[..., :3].std() > 0.05  # a real picture, not a blank canvas


def test_manifest_export_and_model_card(synth_data, tmp_path):
    run = tmp_path / "run"
    run_recipe(run, f"data.path={synth_data}", "trainer.max_steps=2", "logger=default", "logger.sample_every=2")
    man = json.loads((run / "manifest.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert man["git_commit"] == head and isinstance(man["git_dirty"], bool) and man["world_size"] == 1
    assert man["packages"]["torch"].startswith("2.11") and man["config"]["trainer"]["max_steps"] == 2
    lock = ROOT / "requirements" / "lock.txt"
    assert man["environment"]["lock_sha256"] == hashlib.sha256(lock.read_bytes()).hexdigest()
    assert man["environment"]["matches_lock"] is True
    data_manifest = json.loads((synth_data / "manifest.json").read_text())
    assert man["data"]["shards"] == {s["name"]: s["sha256"] for s in data_manifest["shards"]}
    assert man["data"]["license"] == data_manifest["license"]
    assert list((run / "samples").glob("dmel_*.png"))
    wav = next((run / "samples").glob("dmel_*.wav"))  # the predictions as audio (also sent to W&B)
    assert read_wav(wav)[0].shape[-1] > 16000
    m = metrics(run)
    assert all(0 < r["mfu"] < 1.5 for r in m)  # measured CPU peak: a fraction of it (noisy on a shared machine)

    tag = run / "checkpoints" / tag_for(2)
    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "tml.tools.export", str(tag), str(out)], cwd=ROOT, env=ENV, check=True)
    from tml.tools.export import load_exported

    model = load_exported(out)
    assert_same_params({k: v for k, v in model.state_dict().items()}, module_state(run, 2))

    proc = subprocess.run([sys.executable, "-m", "tml.tools.model_card", str(tag)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    card = (tag / "MODEL_CARD.md").read_text()
    total = sum(p.numel() for p in model.parameters())
    assert f"{total / 1e3:.2f}K total" in card and head in card and data_manifest["license"] in card
    assert "Intended use and limits" in card and f"{m[-1]['loss']:.4f}" in card
