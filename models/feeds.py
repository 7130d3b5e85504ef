"""Realistic, seeded input feeds for every builder and zoo model, and the task each model solves.

Images are smooth paper-like backgrounds with lines of dark text (random words in a 5x7
bitmap font, see :mod:`.glyphs`), normalized as
PaddleOCR does: ``(pixel / 255 - 0.5) / 0.5``. Audio is 16 kHz voiced speech-like chunks
(harmonics of a pitch under a formant envelope, plus noise) with some near-silent chunks;
each chunk is 64 context samples + a 512-sample window, as silero-vad's own wrapper feeds it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .glyphs import CHARACTERS, glyph_mask
from .zoo import UnknownModelError

Feed = dict[str, np.ndarray]
Rng = np.random.Generator

TASKS: dict[str, str] = {
    "mlp": "classification",
    "cnn": "classification",
    "control_flow": "regression",
    "transformer": "embedding",
    "ppocr_det_v4": "detection_map",
    "ppocr_rec_v4": "ctc",
    "ppocr_cls": "classification",
    "silero_vad": "vad",
    "silero_vad_op15": "vad",
}


def task_of(name: str) -> str:
    """One of classification, ctc, detection_map, vad, embedding, regression."""
    if name not in TASKS:
        raise UnknownModelError(name, TASKS)
    return TASKS[name]


def _smooth_noise(rng: Rng, h: int, w: int, cell: int = 16) -> np.ndarray:
    """Values in [0, 1) that vary smoothly over ``cell`` pixels (bilinear upsampled grid)."""
    grid = rng.random((h // cell + 2, w // cell + 2))
    ys = np.linspace(0, grid.shape[0] - 1.001, h)
    xs = np.linspace(0, grid.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _paper(rng: Rng, h: int, w: int) -> np.ndarray:
    """A light, slightly tinted, unevenly lit RGB background in pixel units, shape [3, h, w]."""
    light = 165 + 70 * _smooth_noise(rng, h, w, cell=max(8, min(h, w) // 3))
    tint = rng.uniform(-12, 12, size=(3, 1, 1))
    grain = rng.normal(0, 3, size=(3, h, w))
    return light[None] + tint + grain


def _write_line(img: np.ndarray, rng: Rng, top: int, left: int, right: int, height: int) -> None:
    """Write a row of random words in the bitmap font (dark ink, anti-aliased) in place."""
    ink = rng.uniform(15, 70, size=(3, 1, 1))
    cell = max(1, round(height / 7))
    x = left
    while True:
        mask = glyph_mask(CHARACTERS[rng.integers(len(CHARACTERS))], height)
        h, w = mask.shape
        if x + w > right or top + h > img.shape[1]:
            break
        region = img[:, top:top + h, x:x + w]
        img[:, top:top + h, x:x + w] = region * (1 - mask) + ink * mask
        x += w + int(cell * rng.uniform(0.8, 1.6))
        if rng.random() < 0.15:  # word gap
            x += 3 * cell


def _normalize(img: np.ndarray) -> np.ndarray:
    pixels = np.clip(img, 0, 255)
    return ((pixels / 255.0 - 0.5) / 0.5)[None].astype(np.float32)


def _text_line_image(rng: Rng, width: int, height: int = 48) -> np.ndarray:
    img = _paper(rng, height, width)
    glyph_h = int(rng.integers(26, 36))
    top = (height - glyph_h) // 2 + int(rng.integers(-3, 4))
    _write_line(img, rng, top, int(rng.integers(2, 12)), width - int(rng.integers(4, width // 4)), glyph_h)
    return img


DET_SIZES = [(160, 320), (128, 256), (192, 320), (224, 224)]


def _ppocr_det(rng: Rng, i: int) -> Feed:
    h, w = DET_SIZES[i % len(DET_SIZES)]
    img = _paper(rng, h, w)
    y = int(rng.integers(6, 20))
    while y < h - 24:
        glyph_h = int(rng.integers(12, 24))
        left = int(rng.integers(4, w // 4))
        _write_line(img, rng, y, left, int(rng.integers(left + w // 3, w - 4)), glyph_h)
        y += glyph_h + int(rng.integers(10, 30))
    return {"x": _normalize(img)}


def _ppocr_rec(rng: Rng, i: int) -> Feed:
    return {"x": _normalize(_text_line_image(rng, width=int(rng.integers(20, 41)) * 8))}


def _ppocr_cls(rng: Rng, i: int) -> Feed:
    img = _text_line_image(rng, width=192)
    if i % 2:  # every other sample upside down, so both orientations occur
        img = img[:, ::-1, ::-1]
    return {"x": _normalize(img)}


def _speech_chunk(rng: Rng, i: int, samples: int = 64 + 512, rate: int = 16000) -> np.ndarray:
    t = np.arange(samples) / rate
    noise = rng.normal(0, 0.003, samples)
    if i % 4 == 3:  # near-silent chunk
        return noise.astype(np.float32)
    pitch = rng.uniform(90, 250) * (1 + 0.05 * t / t[-1])
    formants = rng.uniform([500, 1200, 2300], [900, 2000, 3200])
    voice = np.zeros(samples)
    for k in range(1, int(4000 // pitch.max())):
        freq = k * pitch
        gain = sum(np.exp(-((freq.mean() - f) / 250) ** 2) for f in formants) + 0.3 / k
        voice += gain * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    envelope = np.sin(np.pi * (t / t[-1] * 0.8 + 0.1))
    voice *= rng.uniform(0.1, 0.4) * envelope / (np.abs(voice).max() + 1e-9)
    return (voice + noise).astype(np.float32)


def _silero(rng: Rng, i: int) -> Feed:
    # silero-vad's own wrapper feeds 64 context samples + a 512-sample window at 16 kHz;
    # a bare 512-sample window leaves the model near 0 for any signal.
    return {"input": _speech_chunk(rng, i)[None],
            "state": np.zeros((2, 1, 128), dtype=np.float32),
            "sr": np.array(16000, dtype=np.int64)}


def _mlp(rng: Rng, i: int) -> Feed:
    return {"x": rng.standard_normal((int(rng.integers(1, 5)), 100)).astype(np.float32)}


def _cnn(rng: Rng, i: int) -> Feed:
    batch = int(rng.integers(1, 4))
    images = [_paper(rng, 32, 32) - 80 * _smooth_noise(rng, 32, 32, cell=4) for _ in range(batch)]
    return {"image": np.concatenate([_normalize(im) for im in images])}


def _control_flow(rng: Rng, i: int) -> Feed:
    return {"x": rng.standard_normal((int(rng.integers(1, 5)), 8)).astype(np.float32),
            "flag": np.array(i % 2 == 0)}


def _transformer(rng: Rng, i: int) -> Feed:
    shape = (int(rng.integers(1, 3)), int(rng.integers(4, 17)), 32)
    return {"tokens": rng.standard_normal(shape).astype(np.float32)}


FEEDS: dict[str, Callable[[Rng, int], Feed]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "control_flow": _control_flow,
    "transformer": _transformer,
    "ppocr_det_v4": _ppocr_det,
    "ppocr_rec_v4": _ppocr_rec,
    "ppocr_cls": _ppocr_cls,
    "silero_vad": _silero,
    "silero_vad_op15": _silero,
}


def sample_feeds(name: str, count: int = 8, seed: int = 0) -> list[Feed]:
    """``count`` input dicts for model ``name`` (a builder or zoo name), reproducible from ``seed``."""
    if name not in FEEDS:
        raise UnknownModelError(name, FEEDS)
    rng = np.random.default_rng(seed)
    return [FEEDS[name](rng, i) for i in range(count)]
