"""An artifact cache so later chapters start from what earlier chapters trained.

An artifact (a model and its tokenizer, a dataset, ...) lives in a folder named after what it is
and a hash of the **recipe** that made it: change the recipe and the old folder is simply not
found, so a stale model is never reused. Folders are written to a temporary name and renamed
into place only when complete, so an interrupted run leaves nothing a later notebook would load.

The cache sits in ``.cache/artifacts`` at the repository root (ignored by git), or wherever the
environment variable ``COURSE_CACHE`` points.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from .config import REPO_ROOT, run_seed

CACHE_ENV = "COURSE_CACHE"
CACHE_FORMAT = 1  # bump when the on-disk layout changes
RECIPE_FILE = "recipe.json"


def cache_root() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or REPO_ROOT / ".cache" / "artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return root


def recipe_key(name: str, recipe: dict) -> str:
    """A short hash of ``name``, ``recipe`` (any JSON-serialisable dict) and this run's ``COURSE_SEED``
    (every seed in a recipe is shifted by it, so a run with another seed builds its own artifacts)."""
    blob = json.dumps(
        {"name": name, "recipe": recipe, "format": CACHE_FORMAT, "course_seed": run_seed()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def artifact_path(name: str, recipe: dict) -> Path:
    return cache_root() / f"{name}-{recipe_key(name, recipe)}"


def is_cached(name: str, recipe: dict) -> bool:
    return (artifact_path(name, recipe) / RECIPE_FILE).is_file()


def save_artifact(name: str, recipe: dict, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` and atomically move the result to the artifact's folder.

    If ``write`` raises (or the process dies), only a ``.tmp-*`` folder is left behind, which is
    never loaded and is cleaned up by :func:`clean_partial`.
    """
    final = artifact_path(name, recipe)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        (tmp / RECIPE_FILE).write_text(
            json.dumps({"name": name, "recipe": recipe, "course_seed": run_seed()}, indent=2, default=str)
        )
        if final.exists():  # someone else finished first, or we are replacing a rebuilt artifact
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_or_build(
    name: str,
    recipe: dict,
    build: Callable[[], object],
    save: Callable[[object, Path], None],
    load: Callable[[Path], object],
    rebuild: bool = False,
):
    """Load the artifact for ``recipe`` if cached; otherwise ``build()`` it, save it, and load it back.

    Loading what was saved means a fresh build hands over exactly what a later run loads, from the
    same folder: a model then knows its path (``config._name_or_path``), which trainers that rebuild
    a reference model from the policy's path (TRL's ``RLOOTrainer``, ``GRPOTrainer``) rely on.
    """
    if not rebuild and is_cached(name, recipe):
        return load(artifact_path(name, recipe))
    obj = build()
    return load(save_artifact(name, recipe, lambda tmp: save(obj, tmp)))


def clean_partial() -> list[Path]:
    """Remove folders left by interrupted writes; returns what was removed."""
    removed = []
    for p in cache_root().glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in cache_root().glob(".old-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
