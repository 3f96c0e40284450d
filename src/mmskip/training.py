"""One trainer for every model this pipeline trains: LLM and encoder pretraining, every mapper.

AdamW with linear warmup and cosine decay, gradient-norm clipping at 1.0, the loss logged every
100 steps, and resumable checkpoints: every ``checkpoint_every`` steps the whole training state
(the trained modules' weights, AdamW and LR-schedule state, torch's RNG state and any extra torch
generators, numpy's RNG state, the step and the loss history) is written under
``checkpoint_dir``, outside the declared outputs. A killed job started again continues from the
latest checkpoint of the same run (same fingerprint of its ``identity``) and ends with the same
bytes as an uninterrupted one. What a step computes is the caller's ``step_loss(step)``; that is
where a transform of the model (a pruning mask, a skip plan) takes effect.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from mmskip.io import atomic_dir, dumps_json, read_json, write_json

log = logging.getLogger(__name__)


# --- checkpoints -------------------------------------------------------------------------------
# checkpoint_dir/step-0000200/{<module>.safetensors, train_state.pt, state.json}: only the latest
# is kept. Bump CHECKPOINT_FORMAT when that layout changes, so older checkpoints are ignored.
CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {t.dtype} {tuple(tensors[name].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())  # the bytes themselves, whatever the dtype
    return h.hexdigest()


def code_digest() -> str:
    """sha256 of the mmskip sources and the numeric libraries' versions.

    A resumed run must execute the same code as the interrupted one, or its result would match
    neither version's uninterrupted run. The whole package, not the mapper's modules only:
    simpler, and a spurious mismatch costs no more than a fresh start.
    """
    import transformers

    h = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__} numpy {np.__version__}\n"
                       .encode())
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        h.update(f"{path.relative_to(package).as_posix()}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(dumps_json(identity).encode()).hexdigest()


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def _is_ours(path: Path) -> bool:
    """A checkpoint folder, or the temporary of one that a killed job left behind (atomic_dir's name)."""
    return bool(_STEP_DIR.fullmatch(path.name)) or bool(re.fullmatch(r"\.step-\d+\..*\.tmp", path.name))


def _remove_checkpoints(folder: Path, keep: Path | None = None) -> None:
    """Delete this module's checkpoints in ``folder`` except ``keep``; nothing else in it is touched."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path != keep and _is_ours(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_checkpoint(folder: Path, step: int, identity: dict, modules: dict, optimizer, schedule,
                    rng: np.random.Generator, losses: list[float], generators: Iterable[torch.Generator] = ()) -> Path:
    """Write the training state after ``step`` steps as one new folder, then drop the older ones.

    The folder appears complete or not at all (atomic_dir), and the previous checkpoint is
    deleted only after it, so a kill at any moment leaves at least one usable checkpoint.
    """
    path = folder / f"step-{step:07d}"
    with atomic_dir(path) as tmp:
        for name, module in modules.items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
        # Tensors, numbers, strings and containers only: torch.load(weights_only=True) reads it back.
        state = {"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        generators = list(generators)
        if generators:
            state["generators"] = [g.get_state() for g in generators]
        torch.save(state, tmp / "train_state.pt")
        write_json(tmp / "state.json", {"fingerprint": fingerprint(identity), "run": identity, "step": step,
                                        "losses": losses, "numpy_rng": rng.bit_generator.state})
    _remove_checkpoints(folder, keep=path)
    return path


def find_checkpoint(folder: Path, identity: dict) -> tuple[Path, dict] | None:
    """The latest checkpoint in ``folder`` that belongs to this run, and its state.json.

    Checkpoints of other runs (other params, seed or inputs) are ignored with a log line naming
    what differs; newest first, since a kill right after a new checkpoint can leave an older
    one of another run next to it.
    """
    for _, path in reversed(_checkpoints(folder)):
        try:
            state = read_json(path / "state.json")
        except (OSError, ValueError) as err:
            log.warning("ignoring checkpoint %s: unreadable state.json (%s)", path, err)
            continue
        if state.get("fingerprint") == fingerprint(identity):
            return path, state
        theirs = state.get("run") if isinstance(state.get("run"), dict) else {}
        differs = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
        log.warning("ignoring checkpoint %s: it belongs to another run (differs in %s)", path,
                    ", ".join(differs) or "fingerprint")
    if _checkpoints(folder):
        log.info("no checkpoint in %s belongs to this run: starting fresh", folder)
    return None


def load_checkpoint(path: Path, state: dict, modules: dict, optimizer, schedule, rng: np.random.Generator,
                    generators: Iterable[torch.Generator] = ()) -> list[float]:
    """Restore the training state saved in ``path`` in place; returns the loss history."""
    if len(state["losses"]) != state["step"]:
        raise ValueError(f"checkpoint {path}: {len(state['losses'])} losses for step {state['step']}; delete it")
    for name, module in modules.items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    train_state = torch.load(path / "train_state.pt", weights_only=True)  # never unpickles code
    optimizer.load_state_dict(train_state["optimizer"])
    schedule.load_state_dict(train_state["scheduler"])
    torch.set_rng_state(train_state["torch_rng"])
    for g, saved in zip(generators, train_state.get("generators", []), strict=True):
        g.set_state(saved)
    rng.bit_generator.state = state["numpy_rng"]
    return [float(x) for x in state["losses"]]


class Trainer:
    """AdamW + warmup/cosine over ``params`` for ``steps`` steps of ``step_loss``; resumable.

    ``modules`` (name -> module) are what a checkpoint saves and restores besides the optimizer;
    ``rng`` and ``generators`` are every random source the steps draw from. Checkpoints are
    written only with a ``checkpoint_dir``, a positive ``checkpoint_every`` and an ``identity``.
    """

    def __init__(self, params: list, steps: int, lr: float, warmup_steps: int, weight_decay: float,
                 rng: np.random.Generator, betas: tuple[float, float] = (0.9, 0.999), desc: str = "train",
                 modules: dict | None = None, generators: Iterable[torch.Generator] = (),
                 checkpoint_dir: Path | None = None, checkpoint_every: int = 0, identity: dict | None = None):
        if warmup_steps >= steps:
            raise ValueError(f"warmup_steps={warmup_steps} must be below the {steps} training steps")
        self.params, self.steps, self.rng, self.desc = params, steps, rng, desc
        self.modules, self.generators = modules or {}, list(generators)
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
        self.schedule = get_cosine_schedule_with_warmup(self.optimizer, warmup_steps, steps)
        self.checkpoint_dir = None if checkpoint_dir is None or identity is None else Path(checkpoint_dir)
        self.checkpoint_every, self.identity = checkpoint_every, identity

    def fit(self, step_loss: Callable[[int], torch.Tensor]) -> list[float]:
        """Run (or resume) the training; the loss of every step."""
        losses, first_step = [], 0
        if self.checkpoint_dir is not None:
            found = find_checkpoint(self.checkpoint_dir, self.identity)
            if found is not None:
                losses = load_checkpoint(*found, self.modules, self.optimizer, self.schedule, self.rng,
                                         self.generators)
                first_step = len(losses)
                log.info("resumed from step %d of %d (%s)", first_step, self.steps, found[0])
        for step in tqdm(range(first_step, self.steps), desc=self.desc, mininterval=5, initial=first_step,
                         total=self.steps):
            loss = step_loss(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % 100 == 0:
                log.info("step %d loss %.4f", step + 1, float(np.mean(losses[-100:])))
            done = step + 1
            # Not after the last step: the final artifacts follow at once.
            if self.checkpoint_dir is not None and self.checkpoint_every and done % self.checkpoint_every == 0 \
                    and done < self.steps:
                save_checkpoint(self.checkpoint_dir, done, self.identity, self.modules, self.optimizer,
                                self.schedule, self.rng, losses, self.generators)
        return losses

    def finish(self) -> None:
        """Delete this run's checkpoints: call once the artifacts are written."""
        folder = self.checkpoint_dir
        if folder is None:
            return
        _remove_checkpoints(folder)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        elif folder.is_dir():
            log.info("kept %s: it holds files that are not checkpoints", folder)
