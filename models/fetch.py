"""Command line: ``python -m onnxopt.models.fetch [names...]`` fetches zoo models into the cache."""

from __future__ import annotations

import argparse
import sys

from .zoo import ZOO, ZooError, fetch_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxopt.models.fetch",
                                     description="Download, verify and cache pretrained zoo models.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to fetch (default: all): {', '.join(ZOO)}")
    args = parser.parse_args(argv)
    try:
        paths = fetch_all(args.names or None, progress=lambda msg: print(msg, file=sys.stderr))
    except ZooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}\t{path.stat().st_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
