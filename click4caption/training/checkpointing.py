"""Training checkpoints: what they hold, atomic writing, rotation and resuming.

A checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` reads::

    {"model":      {name: tensor} for every parameter that requires grad and every
                   persistent buffer (e.g. the box encoder's Gaussian matrix),
     "optimizer":  optimizer.state_dict(),
     "optimizer_param_names": [[names of group 0], [names of group 1]],
     "scaler":     GradScaler.state_dict() or None,
     "epoch":      epoch of the last finished iteration,
     "iteration":  finished iterations = the global step a resumed run starts at,
     "config":     the resolved config (Config.to_dict()),
     "data_state": {"scheme": "step-indexed", "seed", "world_size", "next_step",
                    "skipped": {reason: count} since the run began},
     "version":    FORMAT_VERSION}

Files in ``output_dir/exp_name/``: ``checkpoint_iter<N>.pth`` every
``save_every_iters`` (the newest ``keep_last_ckpts`` kept), ``checkpoint_<epoch>.pth``
at the end of each epoch (upstream's name, all kept) and ``checkpoint_last.pth``, the
newest of all. Each is written to a temporary file in the same folder, flushed to
disk and renamed over the target (``os.replace``), so a crash never leaves a
half-written checkpoint under a checkpoint name; ``checkpoint_last.pth`` and epoch
files are hard links (copies where links are not supported).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from click4caption.checkpoint import summarize_keys
from click4caption.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAST_NAME = "checkpoint_last.pth"
_ITER_RE = re.compile(r"^checkpoint_iter(\d+)\.pth$")


def iter_name(iteration: int) -> str:
    return f"checkpoint_iter{iteration:08d}.pth"


def epoch_name(epoch: int) -> str:
    return f"checkpoint_{epoch}.pth"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad plus all persistent buffers, detached on the CPU."""
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in model.state_dict().items():
        if name in params and not params[name].requires_grad:
            continue
        out[name] = tensor.detach().cpu().clone()
    return out


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load what :func:`trainable_state_dict` saved.

    Raises:
        CheckpointError: a key the model does not have, a shape that differs, or a
            trainable parameter the checkpoint lacks.
    """
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise CheckpointError(f"{source}: keys the model does not have: {summarize_keys(unexpected, limit=8)}")
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state if state[k].shape != own[k].shape]
    if mismatched:
        raise CheckpointError(f"{source}: shapes differ from the model's: {'; '.join(mismatched[:4])}")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise CheckpointError(f"{source}: trainable parameters missing (were other parts frozen?): "
                              f"{summarize_keys(missing, limit=8)}")
    model.load_state_dict(state, strict=False)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` (hard link, else copy), atomically."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(dst.parent)


def write_checkpoint(obj: dict[str, Any], out_dir: Path, iteration: int, keep_last: int,
                     epoch_end: int | None = None) -> Path:
    """Save ``obj`` as ``checkpoint_iter<N>.pth`` (+ ``checkpoint_<epoch>.pth`` when
    ``epoch_end`` is given), point ``checkpoint_last.pth`` at it and drop the oldest
    iteration files beyond ``keep_last``. Returns the path of the new file."""
    out_dir = Path(out_dir)
    path = out_dir / iter_name(iteration)
    atomic_save(obj, path)
    atomic_link(path, out_dir / LAST_NAME)
    if epoch_end is not None:
        atomic_link(path, out_dir / epoch_name(epoch_end))
    rotate(out_dir, keep_last)
    return path


def iteration_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every ``checkpoint_iter*.pth`` in ``out_dir``, oldest first."""
    return sorted((int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := _ITER_RE.match(p.name)))


def average_model_states(states: list[dict[str, torch.Tensor]], sources: list[str]) -> dict[str, torch.Tensor]:
    """The mean of several checkpoints' ``model`` dicts (weight averaging over the end of
    one run): floating tensors averaged in float64 and cast back, other tensors (counters,
    integer buffers) taken from the last and required equal in all. ``sources`` names each
    state in errors. Raises :class:`CheckpointError` naming the keys when the states do
    not hold the same keys and shapes."""
    if not states or len(states) != len(sources):
        raise ValueError("average_model_states needs one source name per state, and at least one state")
    ref, ref_src = states[-1], sources[-1]
    for state, src in zip(states, sources):
        if state.keys() != ref.keys():
            raise CheckpointError(f"cannot average {src} with {ref_src}: keys differ: "
                                  f"{summarize_keys(sorted(state.keys() ^ ref.keys()))}")
        shapes = [k for k in ref if state[k].shape != ref[k].shape]
        if shapes:
            raise CheckpointError(f"cannot average {src} with {ref_src}: shapes differ: {summarize_keys(shapes)}")
    out: dict[str, torch.Tensor] = {}
    for key, last in ref.items():
        if last.is_floating_point():
            total = torch.zeros(last.shape, dtype=torch.float64)
            for state in states:
                total += state[key].double()
            out[key] = (total / len(states)).to(last.dtype)
        else:
            if any(not torch.equal(state[key], last) for state in states):
                raise CheckpointError(f"cannot average {key}: a non-floating tensor differs between {', '.join(sources)}")
            out[key] = last.clone()
    return out


def rotate(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` ``checkpoint_iter*.pth`` files."""
    found = iteration_checkpoints(out_dir)
    for _, p in found[: max(len(found) - max(keep_last, 0), 0)]:
        try:
            p.unlink()
        except OSError as err:
            logger.warning("could not delete old checkpoint %s: %s", p, err)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint with ``weights_only=True`` on the CPU.

    Raises:
        CheckpointError: missing, unreadable, or not a training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(err).splitlines()[0] if str(err) else err}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a Click4Caption checkpoint (no 'model' entry)")
    return ckpt


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete the temporary files a kill during a checkpoint write left (``.*.tmp``);
    a finished write never leaves one. Returns what was removed."""
    removed = []
    for path in Path(out_dir).glob(".*.tmp"):
        try:
            path.unlink()
            removed.append(path)
        except OSError as err:
            logger.warning("could not delete the stale temporary file %s: %s", path, err)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted checkpoint write: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def resolve_resume_path(value: str | None, out_dir: Path) -> Path | None:
    """``run.resume_ckpt_path``: a file, or ``auto``/``last`` for this experiment's
    ``checkpoint_last.pth`` (None when there is none yet: a fresh start)."""
    if not value:
        return None
    if value in ("auto", "last"):
        last = Path(out_dir) / LAST_NAME
        if last.is_file():
            return last
        logger.info("run.resume_ckpt_path is '%s' but %s does not exist: starting fresh", value, last)
        return None
    return Path(value).expanduser()
