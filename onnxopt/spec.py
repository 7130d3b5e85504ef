"""Pipeline specs: `-p name:key=value,...` text and JSON/YAML recipes parse to the same objects.

Canonical text of one step is ``name`` or ``name:key=value,key=value`` with only the
options that differ from their defaults, in declaration order; list values print as
``[a,b]``. A pipeline prints as its steps joined by single spaces. Families (such as
``cleanup``) expand to their members when a pipeline is resolved.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import InputError, UsageError
from .options import build_options, format_value, non_default_items
from .registry import Registry, default_registry


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One resolved pipeline step: a registered pass name and its typed options."""

    name: str
    options: Any

    def text(self) -> str:
        items = non_default_items(self.options)
        if not items:
            return self.name
        return self.name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in items)

    def make_pass(self, registry: Registry | None = None, context=None):
        cls = (registry or default_registry()).get(self.name)
        return cls(self.options, context=context)


def split_step(text: str) -> tuple[str, dict[str, str]]:
    """Split ``name:k=v,k2=[a,b]`` into the name and raw option text values."""
    text = text.strip()
    if not text:
        raise UsageError("empty pass spec")
    name, _, rest = text.partition(":")
    raw: dict[str, str] = {}
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"bad option '{item}' in '{text}': expected key=value")
        key = key.strip()
        if key in raw:
            raise UsageError(f"option '{key}' given twice in '{text}'")
        raw[key] = value.strip()
    return name.strip(), raw


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise UsageError(f"unbalanced ']' in '{text}'")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise UsageError(f"unbalanced '[' in '{text}'")
    if "".join(current).strip():
        parts.append("".join(current))
    return [p for p in parts if p.strip()]


def resolve_step(name: str, raw: dict[str, Any], registry: Registry) -> list[PassSpec]:
    registry.check_known(name)
    routed = registry.dispatch(name)
    if routed is not None:
        key, default, targets = routed
        raw = dict(raw)
        choice = str(raw.pop(key, default))
        if choice not in targets:
            raise UsageError(f"'{name}' option '{key}' must be one of {', '.join(targets)}, not '{choice}'")
        return resolve_step(targets[choice], raw, registry)
    if registry.is_family(name):
        if raw:
            raise UsageError(f"'{name}' is a family of passes and takes no options; "
                             f"name its passes instead: {' '.join(registry.families()[name])}")
        specs: list[PassSpec] = []
        for member in registry.families()[name]:
            member_name, member_raw = split_step(member)
            specs.extend(resolve_step(member_name, member_raw, registry))
        return specs
    cls = registry.get(name)
    return [PassSpec(name, build_options(cls.Options, raw, owner=name))]


def parse_pipeline(steps: list[str], registry: Registry | None = None) -> list[PassSpec]:
    """Parse `-p` texts (each one step, or several separated by spaces) into specs."""
    registry = registry or default_registry()
    specs: list[PassSpec] = []
    for step_text in steps:
        for piece in step_text.split():
            name, raw = split_step(piece)
            specs.extend(resolve_step(name, raw, registry))
    return specs


def parse_recipe(path: str | Path, registry: Registry | None = None) -> list[PassSpec]:
    """Read a JSON or YAML recipe: a list of ``{pass: name, options: {...}}`` (or ``{pipeline: [...]}``)."""
    registry = registry or default_registry()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    data = _load_recipe_text(text, path)
    if isinstance(data, dict) and "pipeline" in data:
        extra = set(data) - {"pipeline", *RECIPE_SETTINGS}
        if extra:
            raise UsageError(f"recipe {path}: unknown keys {sorted(extra)}; valid: pipeline, {', '.join(RECIPE_SETTINGS)}")
        data = data["pipeline"]
    if not isinstance(data, list):
        raise UsageError(f"recipe {path}: expected a list of {{pass, options}} entries")
    specs: list[PassSpec] = []
    for index, entry in enumerate(data):
        if isinstance(entry, str):
            name, raw = split_step(entry)
        elif isinstance(entry, dict) and "pass" in entry:
            extra = set(entry) - {"pass", "options"}
            if extra:
                raise UsageError(f"recipe {path} entry {index}: unknown keys {sorted(extra)}")
            name, raw = str(entry["pass"]), dict(entry.get("options") or {})
        else:
            raise UsageError(f"recipe {path} entry {index}: expected {{pass: NAME, options: {{...}}}}")
        specs.extend(resolve_step(name, raw, registry))
    return specs


# Run settings a recipe of the form {pipeline: [...], ...} may carry besides its passes.
RECIPE_SETTINGS = ("target", "threads", "output_roles")


def recipe_settings(path: str | Path) -> dict[str, Any]:
    """``target``/``threads`` of a ``{pipeline: [...], target: NAME}`` recipe ({} for a plain list)."""
    path = Path(path)
    try:
        data = _load_recipe_text(path.read_text(encoding="utf-8"), path)
    except OSError as exc:
        raise InputError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        return {}
    return {key: data[key] for key in RECIPE_SETTINGS if data.get(key) is not None}


def _load_recipe_text(text: str, path: Path) -> Any:
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"recipe {path} is not valid JSON: {exc}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def pipeline_text(specs: list[PassSpec]) -> str:
    return " ".join(spec.text() for spec in specs)


def recipe_data(specs: list[PassSpec]) -> list[dict[str, Any]]:
    """The JSON-able recipe form of a pipeline (what ``parse_recipe`` reads back)."""
    out = []
    for spec in specs:
        options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in non_default_items(spec.options)}
        out.append({"pass": spec.name, "options": options} if options else {"pass": spec.name})
    return out
