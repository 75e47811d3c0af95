"""Crash-proof checkpoints: DeepSpeed's own files (model, optimizer, lr schedule, ZeRO partitions) plus a small
per-rank trainer state (step, data-loader cursor, RNG states) that DeepSpeed does not keep per rank.

Layout under ``RUN_DIR/checkpoints`` (a filesystem all ranks share)::

    step_00000020/           DeepSpeed files, trainer_state_rank{r}.pt, complete.json (file names and sizes)
    latest                   the newest complete tag, replaced atomically
    .tmp/step_00000030/      a save in progress (never read; removed by the next save)

A save writes everything into ``.tmp/TAG``, then rank 0 writes ``complete.json``, renames the directory into place
and replaces ``latest`` last (both atomic on POSIX). A process killed at any instant therefore leaves either the
previous complete checkpoint or the new one. Resume starts at ``latest`` and falls back, with a warning, to older
complete checkpoints when a newer one is damaged (missing or truncated files, or a load that fails).

Retention: the newest ``keep_last`` checkpoints plus every step that is a multiple of ``keep_every``.

Another number of ranks: at ZeRO stage 0 DeepSpeed keeps the whole optimizer state in one file, so the same
checkpoint loads on any world size. The per-rank data cursors cannot be mapped onto another number of ranks, so the
loader restarts deterministically at the first sample of the epoch after the furthest epoch any old rank reached
(``resharded_loader_state``); step count, schedule, model and optimizer state carry over exactly. ZeRO >= 1
partitions the optimizer state per rank: such a checkpoint is first converted by rank 0 with DeepSpeed's
``ds_to_universal`` into ``step_XXXXXXXX_universal`` next to it (kept, and reused by a later resume; pruned with its
source) and loaded with DeepSpeed's ``checkpoint.load_universal``, which re-partitions the fp32 weights and the Adam
moments over the new ranks (``universal_resume_tag``, ``convert_to_universal``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tml.errors import ConfigError
from tml.model.config import HEADS

log = logging.getLogger(__name__)

MARKER = "complete.json"
UNIVERSAL = "_universal"  # suffix of a checkpoint converted to DeepSpeed's universal format
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is missing or incomplete; the message names the path."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the message names the path and the bytes
    needed. The previous complete checkpoint is untouched and stays ``latest``."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(engine, ckpt_dir: Path, step: int, loader_state: dict, rank: int, world_size: int,
                    nonfinite_skipped: int = 0, keep_last: int = 0, keep_every: int = 0,
                    crash_after_files: bool = False, expert_parallel_size: int = 1,
                    moe_backend: str = "native") -> Path:
    """Save a complete, resumable checkpoint of ``step`` (collective: all ranks call it). Returns its directory.
    ``nonfinite_skipped``: the run's count of skipped non-finite steps so far, restored on resume.
    ``expert_parallel_size``, ``moe_backend``: recorded in ``complete.json`` with the world size (how experts are
    sharded decides whether another number of ranks can load it: ``universal_resume_tag``).

    ``crash_after_files`` kills this process after the files are written but before the checkpoint is published
    (fault injection for tests: ``trainer.fault.kill_in_save_at_step``)."""
    tag = tag_for(step)
    tmp_root = ckpt_dir / ".tmp"
    if rank == 0:
        shutil.rmtree(tmp_root, ignore_errors=True)  # saves that were killed or failed: their space comes back
        (tmp_root / tag).mkdir(parents=True)
    need = bytes_needed(ckpt_dir, engine.module)
    # Not enough free space (rank 0 looks; the directory is shared): every rank stops here, before writing anything.
    free = shutil.disk_usage(ckpt_dir).free if rank == 0 else 0
    short = torch.tensor([float(rank == 0 and free < need)])
    torch.distributed.all_reduce(short)
    if short.item():
        raise CheckpointWriteError(f"not enough space to save step {step} in {ckpt_dir}: about {need} bytes needed, "
                                   f"{free} free; the newest complete checkpoint is {latest_tag(ckpt_dir)}. Free "
                                   f"space there (or lower trainer.keep_last) and resume with trainer.auto_resume=true")
    try:
        torch.save({"step": step, "loader": loader_state, "rng": rng_state(), "world_size": world_size,
                    "nonfinite_skipped": nonfinite_skipped},
                   tmp_root / tag / f"trainer_state_rank{rank}.pt")
        engine.save_checkpoint(str(tmp_root), tag=tag, save_latest=False)
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write as a RuntimeError from its file writer ("file write failed",
        # "basic_ios::clear: iostream error", "[enforce fail at inline_container.cc] unexpected pos")
        if not isinstance(e, OSError) and not any(k in str(e) for k in ("write", "iostream", "inline_container")):
            raise
        # The other ranks wait in a barrier; this process exiting ends it for them (gloo: connection closed; NCCL:
        # parallel.collective_timeout_s). Nothing is published: latest still names the previous checkpoint.
        written = sum(p.stat().st_size for p in (tmp_root / tag).rglob("*") if p.is_file())
        raise CheckpointWriteError(f"writing the checkpoint of step {step} to {tmp_root / tag} failed on rank {rank} "
                                   f"after {written} bytes ({type(e).__name__}: {e}); it needs about {need} bytes, "
                                   f"{shutil.disk_usage(tmp_root).free} are free. The newest complete checkpoint is "
                                   f"{latest_tag(ckpt_dir)}") from e
    torch.distributed.barrier()
    if crash_after_files:
        os._exit(137)
    final = ckpt_dir / tag
    if rank == 0:
        _fsync_tree(tmp_root / tag)
        files = {str(p.relative_to(tmp_root / tag)): p.stat().st_size
                 for p in sorted((tmp_root / tag).rglob("*")) if p.is_file()}
        _write_atomic(tmp_root / tag / MARKER, json.dumps({"step": step, "world_size": world_size, "files": files,
                                                            "expert_parallel": {"size": expert_parallel_size,
                                                                                "backend": moe_backend}}))
        if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
            shutil.rmtree(final)
        os.replace(tmp_root / tag, final)
        _write_atomic(ckpt_dir / "latest", tag)
        prune_checkpoints(ckpt_dir, keep_last, keep_every)
    torch.distributed.barrier()
    return final


def bytes_needed(ckpt_dir: Path, module: torch.nn.Module) -> int:
    """Bytes the next save of ``ckpt_dir`` will write: the size of its newest complete checkpoint, or, before the
    first one, the module's weights plus two Adam moments of the same size (at ZeRO 0 in fp32, the usual case)."""
    tag = latest_tag(ckpt_dir)
    if tag is not None and (ckpt_dir / tag / MARKER).exists():
        return sum(json.loads((ckpt_dir / tag / MARKER).read_text())["files"].values())
    return 3 * sum(p.numel() * p.element_size() for p in module.parameters())


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the published checkpoint directories, ascending (complete or not)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _TAG.match(p.name)))


def prune_checkpoints(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[int]:
    """Delete all but the newest ``keep_last`` (0 = keep all) and the multiples of ``keep_every``. Returns the
    deleted steps. The tag ``latest`` names is never deleted."""
    if keep_last <= 0:
        return []
    steps = checkpoint_steps(ckpt_dir)
    latest = latest_tag(ckpt_dir)
    keep = set(steps[-keep_last:]) | {s for s in steps if keep_every > 0 and s % keep_every == 0}
    gone = [s for s in steps if s not in keep and tag_for(s) != latest]
    for s in gone:
        shutil.rmtree(ckpt_dir / tag_for(s), ignore_errors=True)
        shutil.rmtree(ckpt_dir / (tag_for(s) + UNIVERSAL), ignore_errors=True)
    return gone


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.exists() else None


def damage(tag_dir: Path) -> str | None:
    """Why ``tag_dir`` is not a complete checkpoint, or None when every file named in its marker is intact."""
    marker = tag_dir / MARKER
    if not marker.exists():
        return f"{marker} is missing (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"{marker} is unreadable ({e})"
    for name, size in files.items():
        p = tag_dir / name
        if not p.exists():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} has {p.stat().st_size} bytes, {size} were written"
    return None


def resume_candidates(ckpt_dir: Path) -> list[str]:
    """Tags to try, best first: the one ``latest`` names, then every older published one, newest first."""
    tags = [tag_for(s) for s in reversed(checkpoint_steps(ckpt_dir))]
    latest = latest_tag(ckpt_dir)
    if latest in tags:
        tags = tags[tags.index(latest):]
    return tags


def resharded_loader_state(states: list[dict]) -> dict:
    """Loader state for a new world size from the old ranks' states: restart at the first row of the epoch after
    the furthest one any old rank's workers reached (the shard assignment depends on the world size, so positions
    inside an epoch do not carry over). ``PackedBatchLoader.load_state_dict`` understands ``restart_epoch``."""
    return {"restart_epoch": max(w[0] for s in states for w in s["workers"]) + 1}


def universal_resume_tag(ckpt_dir: Path, world_size: int, zero_stage: int, expert_parallel_size: int,
                         moe_backend: str = "native") -> str | None:
    """The checkpoint a resume will load when it has to go through DeepSpeed's universal format: at ZeRO >= 1 one
    written by another number of ranks or expert-parallel size (its partitions do not fit the new ranks). None when
    the newest complete checkpoint loads as it is. Decide this before building the engine: ``checkpoint.load_universal``
    is part of its config.

    Sharded experts move to other ranks only with DeepSpeed AutoEP at ZeRO 3 on both sides (its universal format
    records where each expert lives); the native backend keeps its shards in ZeRO 1/2 partitions that the conversion
    cannot place, so such a checkpoint resumes on the ranks and expert-parallel size that wrote it."""
    if zero_stage == 0:
        return None
    for tag in resume_candidates(ckpt_dir):
        if damage(ckpt_dir / tag) is None:
            meta = json.loads((ckpt_dir / tag / MARKER).read_text())
            written_by = meta["world_size"]
            written_ep = meta.get("expert_parallel", {"size": 1, "backend": "native"})  # older checkpoints: none
            if written_by == world_size and written_ep["size"] == expert_parallel_size:
                return None
            autoep3 = zero_stage == 3 and moe_backend == written_ep["backend"] == "deepspeed"
            if (expert_parallel_size > 1 or written_ep["size"] > 1) and not (
                    autoep3 and expert_parallel_size > 1 and written_ep["size"] > 1):
                raise CheckpointError(
                    f"{ckpt_dir / tag} was written by {written_by} ranks with parallel.expert_parallel_size="
                    f"{written_ep['size']} (moe_backend={written_ep['backend']}); resuming on {world_size} with "
                    f"parallel.expert_parallel_size={expert_parallel_size} (moe_backend={moe_backend}) would move "
                    f"experts between ranks, which the universal conversion does only for parallel.moe_backend="
                    f"deepspeed at parallel.zero_stage=3 with expert parallelism on both sides: resume on "
                    f"{written_by} ranks with parallel.expert_parallel_size={written_ep['size']}")
            return tag
    return None


def convert_to_universal(ckpt_dir: Path, tag: str, rank: int) -> str:
    """Rank 0 converts ``ckpt_dir/tag`` with ``python -m deepspeed.checkpoint.ds_to_universal`` into
    ``tag + "_universal"`` (via ``.tmp``, renamed when complete; an existing conversion is reused); every rank waits
    for it. Returns the converted tag. Raises CheckpointError with the converter's output if it fails."""
    import torch.distributed as dist

    out = tag + UNIVERSAL
    error = None
    if rank == 0 and not (ckpt_dir / out).is_dir():
        tmp = ckpt_dir / ".tmp" / out
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        log.warning("converting %s to DeepSpeed's universal format for the new number of ranks", ckpt_dir / tag)
        # --inject_missing_state: our saves carry no Megatron tensor-parallel metadata, which the converter wants
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(ckpt_dir / tag), "--output_folder", str(tmp), "--inject_missing_state",
                               "--num_extract_workers", "1", "--num_merge_workers", "1"],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, ckpt_dir / out)
        else:
            error = CheckpointError(f"converting {ckpt_dir / tag} to the universal format failed:\n"
                                    f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    failed = torch.tensor([float(error is not None)])
    if dist.is_initialized():
        dist.all_reduce(failed)  # every rank learns of rank 0's failure instead of waiting for it
    if error is not None:
        raise error
    if failed.item():
        raise CheckpointError(f"rank 0 failed to convert {ckpt_dir / tag} to the universal format (see its log)")
    return out


def load_checkpoint(engine, ckpt_dir: Path, rank: int, world_size: int, zero_stage: int,
                    universal_tag: str | None = None) -> tuple[str, dict]:
    """Load the newest complete checkpoint into ``engine``; return its tag and this rank's trainer state
    (step, loader, rng). On another world size the loader state is ``resharded_loader_state``.

    ``universal_tag`` (from ``convert_to_universal``; the engine built with ``checkpoint.load_universal``): load the
    DeepSpeed state from that conversion and the trainer state from the checkpoint it was converted from."""
    if universal_tag is not None:
        tag = universal_tag.removesuffix(UNIVERSAL)
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=universal_tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed found nothing to load in {ckpt_dir / universal_tag}")
        if zero_stage == 3:
            _restore_group_hyperparameters(engine.optimizer, ckpt_dir / universal_tag)
        return tag, _resharded_state(ckpt_dir, tag, rank, world_size)
    tried = []
    for tag in resume_candidates(ckpt_dir):
        why = damage(ckpt_dir / tag)
        if why is None:
            meta = json.loads((ckpt_dir / tag / MARKER).read_text())
            if meta["world_size"] != world_size and zero_stage > 0:
                # only as a fallback from a newer, damaged checkpoint: the engine was built for a same-size load
                raise CheckpointError(
                    f"{ckpt_dir / tag} was written by {meta['world_size']} ranks and parallel.zero_stage="
                    f"{zero_stage} partitions the optimizer per rank; it is the fallback from newer damaged "
                    f"checkpoints ({'; '.join(tried)}): remove those and resume again (it is then converted to the "
                    f"universal format), or resume on {meta['world_size']} ranks")
            try:
                path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
                if path is None:
                    raise CheckpointError("DeepSpeed found nothing to load")
                if meta["world_size"] == world_size:
                    return tag, torch.load(ckpt_dir / tag / f"trainer_state_rank{rank}.pt", weights_only=False)
                return tag, _resharded_state(ckpt_dir, tag, rank, world_size)
            except CheckpointError:
                raise
            except Exception as e:  # a damaged file that kept its size
                why = f"loading failed: {type(e).__name__}: {e}"
        if rank == 0:
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", ckpt_dir / tag, why)
        tried.append(f"{tag}: {why}")
    raise CheckpointError(f"trainer.resume=true but {ckpt_dir} holds no complete checkpoint"
                          + (f" (tried {'; '.join(tried)})" if tried else "")
                          + "; start without trainer.resume or point hydra.run.dir at the run to resume")


def _restore_group_hyperparameters(optimizer, universal_dir: Path) -> None:
    """Give every optimizer param group its own saved hyperparameters back after a ZeRO-3 universal load. DeepSpeed's
    (0.19.8; its ZeRO 1/2 load matches groups by index) copies group 0's onto every group, so the no-decay group (norms, biases, embeddings' pad) came back
    with weight decay and the resumed run drifted from an uninterrupted one (measured: 2e-4 in the next loss)."""
    saved = torch.load(universal_dir / "zero" / "optimizer_state.pt", weights_only=False)
    groups = saved["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{universal_dir} holds {len(groups)} optimizer param groups, the optimizer has "
                              f"{len(optimizer.param_groups)}: resume with the training config that wrote it")
    for group, saved_group in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def _resharded_state(ckpt_dir: Path, tag: str, rank: int, world_size: int) -> dict:
    """Trainer state for resuming ``tag`` on a world size other than the one that wrote it."""
    written_by = json.loads((ckpt_dir / tag / MARKER).read_text())["world_size"]
    old = [torch.load(ckpt_dir / tag / f"trainer_state_rank{r}.pt", weights_only=False) for r in range(written_by)]
    state = dict(old[0], loader=resharded_loader_state([s["loader"] for s in old]))
    if rank == 0:
        log.warning("%s was written by %d ranks, resuming on %d: the data loader restarts at epoch %d",
                    ckpt_dir / tag, written_by, world_size, state["loader"]["restart_epoch"])
    return state


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """A run dir, its ``checkpoints`` dir or one ``step_XXXXXXXX`` dir -> (run dir, step dir). The run dir is the
    one holding ``config.resolved.json``; without a step dir, the newest checkpoint (``latest``) is taken."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").exists():
        path = path / latest_tag(path)
    run_dir = path.parent.parent
    if not (path / "mp_rank_00_model_states.pt").exists() or not (run_dir / "config.resolved.json").exists():
        raise CheckpointError(f"checkpoint={path}: expected RUN_DIR, RUN_DIR/checkpoints or "
                              f"RUN_DIR/checkpoints/step_XXXXXXXX of a pretrain run (with mp_rank_00_model_states.pt "
                              f"and RUN_DIR/config.resolved.json)")
    return run_dir, path


def load_model_weights(model: torch.nn.Module, step_dir: Path) -> None:
    """Load a DeepSpeed checkpoint's module weights into a plain model (inference: no engine, no optimizer)."""
    state = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    module = state.get("module")
    if not module or any(t.numel() == 0 for t in module.values()):
        raise CheckpointError(f"{step_dir} holds no full module weights (ZeRO-3 partitions them): gather them with "
                              f"DeepSpeed's zero_to_fp32.py first")
    model.load_state_dict({k: v.float() for k, v in module.items()})


def checkpoint_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a checkpoint (gathered from ZeRO partitions when there are any)."""
    tag_dir = Path(tag_dir)
    if list(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    files = sorted(tag_dir.glob("mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir} holds no mp_rank_00_model_states.pt: not a tml checkpoint dir "
                                f"(pass RUN_DIR/checkpoints/step_XXXXXXXX)")
    return {k: v.float() for k, v in torch.load(files[0], map_location="cpu", weights_only=False)["module"].items()}


def load_initial_weights(model: torch.nn.Module, source: str | Path) -> Path:
    """``trainer.init_from``: copy the weights of an export (a dir with ``model.safetensors``) or of a checkpoint
    (RUN_DIR, RUN_DIR/checkpoints or a step dir) into ``model``; nothing else (optimizer, step, data) carries over.
    Raises ConfigError naming every tensor that is missing, unexpected or of another shape, except a head that a
    config can switch off (``None`` among its choices in ``tml.model.config.HEADS``, e.g. ``model.heads.floor``)
    missing from weights trained without it: it starts fresh. Returns the file or step dir read."""
    path = Path(source)
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        where, state = path / "model.safetensors", load_file(str(path / "model.safetensors"))
    else:
        try:
            _, where = find_checkpoint(path)
        except CheckpointError as e:
            raise ConfigError(f"trainer.init_from={source}: neither an export (model.safetensors) nor a checkpoint: "
                              f"{e}") from e
        state = checkpoint_state_dict(where)
    want = model.state_dict()
    optional = tuple(f"{name}_head." for name, choices in HEADS.items() if None in choices.values())
    fresh = sorted(k for k in want.keys() - state.keys() if k.startswith(optional))
    if fresh:
        log.info("trainer.init_from=%s lacks heads this model has: %s start from their initialisation", source, fresh)
    missing = sorted(want.keys() - state.keys() - set(fresh))
    unexpected = sorted(state.keys() - want.keys())
    differ = [f"{k} {list(state[k].shape)} there vs {list(v.shape)} here" for k, v in want.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or differ:
        parts = [f"{len(differ)} shapes differ ({'; '.join(differ[:3])})" if differ else "",
                 f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
                 f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})" if unexpected else ""]
        raise ConfigError(f"trainer.init_from={source}: its weights do not fit this model: "
                          f"{'; '.join(p for p in parts if p)}. Use the model config they were trained with (the "
                          f"export's config.json / the run's config.resolved.json) and a tokenizer of the same "
                          f"vocabulary size (model.vocab_size follows data's tokenizer.json)")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()}, strict=not fresh)
    return where
