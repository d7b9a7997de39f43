"""``init``: write a starter job file from one of the shipped templates (``templates/``)."""

from __future__ import annotations

import shutil
from pathlib import Path

# hpc_elastic/templates is a link to the repository's top-level templates/ directory, and the
# templates are package data, so they ship with the package and stay editable in one place.
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def template_names() -> list[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.yaml"))


def write_template(name: str, dest: Path, force: bool = False) -> Path:
    """Copy template ``name`` to ``dest``; refuse to overwrite unless ``force``."""
    source = TEMPLATE_DIR / f"{name}.yaml"
    if not source.is_file():
        raise ValueError(f"there is no template '{name}'. Choose one of: "
                         f"{', '.join(template_names())} (e.g. --template cpu).")
    if dest.exists() and not force:
        raise ValueError(f"{dest} exists already; nothing was written. Choose another name with "
                         "--output, or pass --force to overwrite it.")
    shutil.copyfile(source, dest)
    return dest
