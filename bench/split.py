"""Split benchmark: N = 2, 3, 4 stages by params and by flops on the fetched models.

For each model, cost and N: the largest stage's cost over the ideal (total/N, or the largest
single node when that is bigger; target <= 1.1), the split time (marking, export of checker-
valid stages, stitch-back: median of --repeat runs, reference run excluded) and the stitch-back
max abs difference against the original. Candidates alternate (model by model, N and cost
interleaved per repeat). Usage: python bench/split.py [--repeat 3] [--models a,b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODELS = ["ppocr_det_v4", "ppocr_rec_v4", "ppocr_cls", "silero_vad"]
COSTS = ["params", "flops"]
STAGES = [2, 3, 4]


def run(models: list[str], repeat: int, samples: int) -> list[dict]:
    from onnxopt.model_io import load_model
    from onnxopt.models.feeds import sample_feeds
    from onnxopt.models.zoo import cached_path
    from onnxopt.split_run import split_model, split_spec

    rows = []
    for name in models:
        path = cached_path(name)
        if path is None:
            print(f"skip {name}: not fetched (onnxopt zoo fetch {name})", file=sys.stderr)
            continue
        feeds = sample_feeds(name, count=samples)
        cases = [(by, n) for n in STAGES for by in COSTS]
        times: dict[tuple, list[float]] = {c: [] for c in cases}
        last: dict[tuple, object] = {}
        for _ in range(repeat):
            for case in cases:
                by, n = case
                with tempfile.TemporaryDirectory(prefix="onnxopt-bench-split-") as tmp:
                    model = load_model(path)
                    start = time.perf_counter()
                    result = split_model(model, path, Path(tmp) / "out", split_spec(stages=n, by=by), feeds)
                    elapsed = time.perf_counter() - start - result.seconds.get("reference", 0.0)
                times[case].append(elapsed)
                last[case] = result
        for case in cases:
            by, n = case
            result = last[case]
            worst = max((m.get("max_abs") or 0.0) for m in result.stitch.metrics.values())
            rows.append({"model": name, "by": by, "stages": n, "nodes": sum(s["nodes"] for s in result.manifest["stages"]),
                         "max_over_ideal": round(result.pass_stats["max_over_ideal"], 3),
                         "order": result.pass_stats.get("order"),
                         "meets_1.1": result.pass_stats["max_over_ideal"] <= 1.1,
                         "split_s": round(statistics.median(times[case]), 2),
                         "stitch_exact": result.stitch.equal, "stitch_max_abs": worst})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2, help="validation feeds for the stitch-back check")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    for line in common.machine_lines():
        print(line)
    rows = run([m for m in args.models.split(",") if m], args.repeat, args.samples)
    common.print_table(rows, ["model", "by", "stages", "max_over_ideal", "order", "meets_1.1", "split_s", "stitch_exact",
                              "stitch_max_abs"])
    misses = [r for r in rows if not r["meets_1.1"] or not r["stitch_exact"]]
    print(f"{len(rows) - len(misses)}/{len(rows)} meet the 1.1x target with exact stitch-back")
    for r in misses:
        print(f"miss: {r['model']} by {r['by']} N={r['stages']}: {r['max_over_ideal']}x"
              f"{'' if r['stitch_exact'] else ', stitch-back differs'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
