"""Starting or resuming a run directory.

A fresh run writes ``config.yaml``: the resolved configuration, with ``model.path`` replaced by the
resolved θ_sft directory, so ``warp-rlhf train --config <run>/config.yaml`` repeats the run. A resume
compares the current configuration with that file and refuses any difference (naming the keys) unless
forced; it then continues after the last completed iteration and each run's last step checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from warp_rlhf.config import Config, ConfigError, dump_config
from warp_rlhf.outputs import RunDir, write_atomic

log = logging.getLogger("warp_rlhf")


class ResumeError(ConfigError):
    """The output directory cannot be started or resumed as asked."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    a, b = flatten(saved), flatten(current)
    return [f"{k} ({a.get(k)!r} → {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_holds_no_foreign_files(out: RunDir) -> None:
    """A run directory that holds no run yet must be absent or empty: a run never writes among other files."""
    if not out.config.is_file() and out.root.exists() and any(out.root.iterdir()):
        raise ResumeError(f"output.dir {str(out.root)!r} exists, is not empty and holds no run")


def prepare_run_dir(out: RunDir, cfg: Config, resume: bool, force: bool) -> int:
    """Create or check the output directory; returns the number of completed iterations."""
    started = out.config.is_file()
    if started and not resume:
        raise ResumeError(
            f"output.dir {str(out.root)!r} already holds a run; pass --resume to continue it, "
            "or set output.dir to a new directory"
        )
    if not started:
        check_holds_no_foreign_files(out)
        out.root.mkdir(parents=True, exist_ok=True)
        write_atomic(out.config, dump_config(cfg))
        if resume:
            log.info("nothing to resume in %s: starting a new run", out.root)
        return 0
    saved = yaml.safe_load(out.config.read_text()) or {}
    differences = config_differences(saved, cfg.to_dict())
    if differences and not force:
        raise ResumeError(
            f"cannot resume {str(out.root)!r} with a different config: {'; '.join(differences)} "
            "(pass --force to resume anyway)"
        )
    if differences:
        log.warning("resuming with a different config (forced): %s", "; ".join(differences))
        write_atomic(out.config, dump_config(cfg))
    done = out.completed_iterations()
    log.info("resuming %s after %d completed iteration(s)", out.root, done)
    return done


def recorded_dtype(out: RunDir) -> str | None:
    """The model dtype a started run recorded (``model.dtype: auto`` resolved when it began), if any."""
    if not out.config.is_file():
        return None
    saved = yaml.safe_load(out.config.read_text()) or {}
    return (saved.get("model") or {}).get("dtype")


def resolved(cfg: Config, sft_dir: Path) -> Config:
    """The config with model.path pointing at the resolved θ_sft directory."""
    from dataclasses import replace

    return replace(cfg, model=replace(cfg.model, path=str(sft_dir)))
