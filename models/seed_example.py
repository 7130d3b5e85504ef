"""The seed document's worked example: compress, share, quantize and prune the trained MLP.

``python -m onnxopt.models.seed_example [--out DIR] [--markdown]`` writes the trained
100 -> 64 -> 32 -> 10 MLP (``builders.build_mlp``), a calibration set and a labelled
evaluation set of its synthetic task, runs every step through ``api.optimize`` (each pass
validated against the float model on the evaluation feeds, within ``--budget``), and prints
file size, parameters and accuracy after every step. Steps build on each other as the
seed does: clip the weights (L2 or L1 norm), prune (``prune-weights``, when that pass is
installed), then either share parameters (k-means codebooks) or quantize with power-of-two
fixed-point scales (``x_int = round(x * 2^n)``) at 8, 4, 2 and 1 bits.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from . import builders

RECIPES = Path(__file__).resolve().parent / "recipes"
BUDGET = "agreement=0.9"  # top-1 agreement with the float model on the evaluation feeds

CLIP = "clip-weights:norm=l2,factor=3,min_elements=0"
PRUNE = "prune-weights:sparsity=0.5,min_elements=0"


@dataclass(frozen=True)
class Step:
    label: str
    passes: tuple[str, ...]


def steps(with_pruning: bool) -> list[Step]:
    """The table's rows: each names the whole pipeline run on the float model."""
    base = (CLIP, PRUNE) if with_pruning else (CLIP,)
    rows = [Step("float32, trained", ()),
            Step("clip weights, L2 norm (3 x RMS)", (CLIP,)),
            Step("clip weights, L1 norm (4 x mean abs w)", ("clip-weights:norm=l1,factor=4,min_elements=0",))]
    if with_pruning:
        rows += [Step("+ prune 50% (L1), dense", base),
                 Step("+ prune 50%, packed storage", (CLIP, PRUNE.replace("min_elements=0", "min_elements=0,storage=packed,"
                                                                            "pack_min_elements=0")))]
    rows += [Step("+ share: merge identical, 4-bit k-means codebooks", base + (
                 "merge-identical-weights", "cluster-weights:bits=4,min_elements=0")),
             Step("+ share: 2-bit k-means codebooks per 8 channels", base + (
                 "cluster-weights:bits=2,granularity=per-channel-group,min_elements=0",))]
    for bits in (8, 4, 2):
        rows.append(Step(f"+ int{bits} weights, scales 2^-n", base + (
            f"quantize-weights:bits={bits},pow2=true,min_elements=0",)))
    rows.append(Step("+ 1-bit weights (sign x channel scale)", base + ("quantize-weights:bits=1,min_elements=0",)))
    return rows


def write_inputs(directory: Path) -> tuple[Path, Path, Path, np.ndarray]:
    """The float model, calibration feeds (512 samples) and evaluation feeds (2000) with their labels."""
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "mlp.onnx"
    onnx.save(builders.build_mlp(), model)
    x, _ = builders.mlp_task(512, seed=100)
    np.savez(directory / "calibration.npz", x=x.reshape(16, 32, 100))
    x, labels = builders.mlp_task(2000, seed=200)
    np.savez(directory / "evaluation.npz", x=x.reshape(20, 100, 100))
    np.save(directory / "evaluation_labels.npy", labels)
    return model, directory / "calibration.npz", directory / "evaluation.npz", labels


def accuracy(path: Path, evaluation: Path, labels: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.load(evaluation)["x"].reshape(-1, 100)
    return float((session.run(None, {"x": x})[0].argmax(axis=1) == labels).mean())


def parameters(path: Path) -> tuple[int, int]:
    """(stored elements, non-zero stored elements) of every initializer and Constant tensor."""
    from onnxopt.passes.share.scope import stored_weights

    total = nonzero = 0
    for weight in stored_weights(ir.load(path)):
        array = weight.array()
        total += array.size
        nonzero += int(np.count_nonzero(array))
    return total, nonzero


def run(directory: Path, budget: str = BUDGET) -> list[dict]:
    from onnxopt import api
    from onnxopt.registry import default_registry

    model, calibration, evaluation, labels = write_inputs(directory)
    with_pruning = "prune-weights" in default_registry().names()
    rows = []
    for index, step in enumerate(steps(with_pruning)):
        row = {"step": step.label, "pipeline": " ".join(step.passes) or "-", "status": "ok"}
        output = model
        if step.passes:
            output = directory / f"step{index}.onnx"
            result = api.optimize(model, output, list(step.passes), data=calibration, eval_data=evaluation,
                                  budget=budget, keep_going=True)
            notes = [f"{p['spec'].split(':')[0]} {p['status'].replace('_', ' ')}" for p in result.report["passes"]
                     if p["status"] not in ("ok", "ok (no change)")]
            fallback = [p["fallback"] for p in result.report["passes"] if p.get("fallback")]
            if fallback and fallback[-1].get("promoted_nodes"):
                notes.append(f"{len(fallback[-1]['promoted_nodes'])} nodes promoted ({fallback[-1]['precision']})")
            if fallback and fallback[-1].get("float_nodes"):
                notes.append(f"{len(fallback[-1]['float_nodes'])} nodes kept float")
            row["status"] = "; ".join(notes) or "ok"
            if result.output is None:
                row.update(bytes=None, parameters=None, nonzero=None, accuracy=None)
                rows.append(row)
                continue
        total, nonzero = parameters(output)
        row.update(bytes=output.stat().st_size, parameters=total, nonzero=nonzero,
                   accuracy=accuracy(output, evaluation, labels), asked=None)
        if "promoted" in row["status"] or "kept float" in row["status"] or "rolled back" in row["status"]:
            # What the step gives at the precision it asked for, still measured but without the budget.
            asked = directory / f"step{index}_asked.onnx"
            api.optimize(model, asked, list(step.passes), data=calibration, eval_data=evaluation, budget="none")
            row["asked"] = (asked.stat().st_size, accuracy(asked, evaluation, labels))
        rows.append(row)
    return rows


def table(rows: list[dict], markdown: bool) -> str:
    base = rows[0]["bytes"]
    head = ["step", "file bytes", "size", "parameters", "non-zero", "accuracy", "validation",
            "without the budget: size, accuracy"]
    lines = []
    for row in rows:
        if row["bytes"] is None:
            cells = [row["step"], "-", "-", "-", "-", "-", row["status"], "-"]
        else:
            asked = "same" if row["asked"] is None else f"{row['asked'][0] / base:.3f}x, {row['asked'][1]:.3f}"
            cells = [row["step"], str(row["bytes"]), f"{row['bytes'] / base:.3f}x", str(row["parameters"]),
                     str(row["nonzero"]), f"{row['accuracy']:.3f}", row["status"], asked]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(c[i]) for c in [head] + lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in [head] + lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for the models and data (default: a temporary one)")
    parser.add_argument("--budget", default=BUDGET, help=f"budget every lossy step must hold (default {BUDGET})")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if args.out:
        rows = run(args.out, args.budget)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = run(Path(tmp), args.budget)
    print(table(rows, args.markdown))
    for row in rows:
        print(f"  {row['step']}: {row['pipeline']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
