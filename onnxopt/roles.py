"""Output roles: what each graph output is for, which decides how its fidelity is judged.

A role is declared (``--output-role NAME=ROLE[:key=value,...]``, a recipe's ``output_roles``,
``api.optimize(output_roles=...)``) or inferred from the reference model and its outputs.
Inference is conservative: an output becomes ``scores``, ``sequence``, ``probability``,
``embedding`` or ``boxes`` only on clear evidence (the op that produces it, its name, its
values); anything else is ``raw`` (cosine, SNR, max abs), never a decision metric that could
reject a good model. Every role records why it was chosen.

Role options are either parameters of its metric (``threshold``, ``layout``...) or per-output
floors on a metric key (``sentence_embedding=embedding:nn_agreement=0.95``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import UsageError

ROLES = ("scores", "sequence", "probability", "embedding", "boxes", "state", "raw")

# Parameters each role takes, with defaults (text values are parsed by the role's metric).
ROLE_PARAMS: dict[str, dict[str, float | str]] = {
    "scores": {},
    # decode=ctc: a sequence also agrees when its greedy CTC strings (repeats collapsed, ``blank``
    # dropped) are equal, as a text recognizer reads them.
    "sequence": {"decode": "steps", "blank": 0},
    "probability": {"threshold": 0.5},
    "embedding": {},
    # layout: ``cxa`` = [N, 4+C, A] (YOLOv8), ``ac`` = [N, A, 4+C], ``aoc`` = [N, A, 5+C] (YOLOv5,
    # objectness at column 4); box: ``xywh`` (centre, size) or ``xyxy``.
    "boxes": {"layout": "auto", "box": "xywh", "score_threshold": 0.25, "nms_iou": 0.45, "match_iou": 0.5,
              "max_boxes": 300},
    "state": {},
    "raw": {},
}

# Default floors per role, used when no --budget is given. Every role keeps the output's
# direction (cosine); roles that carry a decision add the decision's agreement.
BASE_FLOORS = {"cosine": 0.99}
ROLE_FLOORS: dict[str, dict[str, float]] = {
    "scores": {"agreement": 0.99},
    "sequence": {"agreement": 0.99, "sequence_agreement": 0.99},
    "probability": {"agreement": 0.99},
    "embedding": {"cosine_worst": 0.99, "nn_agreement": 0.99},
    "boxes": {"box_f1": 0.99},
    "state": {},
    "raw": {},
}

# The metric keys each role measures beyond the numeric ones every output gets.
ROLE_METRICS: dict[str, tuple[str, ...]] = {
    "scores": ("agreement",),
    "sequence": ("agreement", "sequence_agreement"),
    "probability": ("agreement",),
    "embedding": ("cosine_worst", "cosine_mean", "nn_agreement"),
    "boxes": ("box_f1", "boxes_reference"),
    "state": (),
    "raw": (),
}


@dataclass(frozen=True)
class OutputRole:
    role: str
    declared: bool = False
    why: str = ""
    params: dict = field(default_factory=dict)
    floors: dict = field(default_factory=dict)

    def param(self, key: str):
        return self.params.get(key, ROLE_PARAMS[self.role].get(key))

    def text(self) -> str:
        items = [f"{k}={v}" for k, v in {**self.params, **self.floors}.items()]
        return self.role + (":" + ",".join(items) if items else "")

    def as_dict(self) -> dict:
        return {"role": self.role, "declared": self.declared, "why": self.why,
                "params": dict(self.params), "floors": dict(self.floors)}


def parse_role(text: str, *, declared: bool = True, why: str = "declared") -> OutputRole:
    """``ROLE[:key=value,...]``: role parameters and per-output metric floors."""
    from .metrics import metric_direction

    role, _, rest = text.strip().partition(":")
    role = role.strip()
    if role not in ROLES:
        raise UsageError(f"unknown output role '{role}'; roles: {', '.join(ROLES)}")
    params, floors = {}, {}
    for item in (p for p in rest.split(",") if p.strip()):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise UsageError(f"bad output role option '{item}' in '{text}': expected key=value")
        if key in ROLE_PARAMS[role]:
            default = ROLE_PARAMS[role][key]
            params[key] = value if isinstance(default, str) else _number(value, key, text)
        elif metric_direction(key) is not None:
            floors[key] = _number(value, key, text)
        else:
            known = ", ".join(list(ROLE_PARAMS[role]) or ["(no parameters)"])
            raise UsageError(f"output role '{role}' has no option '{key}'; parameters: {known}; "
                             "or a metric key to set this output's floor")
    if role == "boxes" and params.get("layout", "auto") not in ("auto", "cxa", "ac", "aoc"):
        raise UsageError(f"boxes layout must be auto, cxa ([N,4+C,A]), ac ([N,A,4+C]) or aoc ([N,A,5+C]), "
                         f"not '{params['layout']}'")
    if role == "sequence" and params.get("decode", "steps") not in ("steps", "ctc"):
        raise UsageError(f"sequence decode must be steps or ctc, not '{params['decode']}'")
    if role == "boxes" and params.get("box", "xywh") not in ("xywh", "xyxy"):
        raise UsageError(f"boxes box must be xywh or xyxy, not '{params['box']}'")
    return OutputRole(role, declared, why, params, floors)


def _number(value: str, key: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"output role option '{key}' in '{text}': '{value}' is not a number") from None


def parse_role_specs(specs) -> dict[str, OutputRole]:
    """Declared roles from ``["NAME=ROLE[:k=v,...]", ...]`` or ``{NAME: "ROLE[:k=v,...]"}``."""
    if not specs:
        return {}
    if isinstance(specs, dict):
        items = [(str(k), v) for k, v in specs.items()]
    else:
        items = []
        for spec in specs:
            name, eq, role = str(spec).partition("=")
            if not eq or not name.strip():
                raise UsageError(f"bad --output-role '{spec}': expected NAME=ROLE[:key=value,...]")
            items.append((name.strip(), role))
    roles: dict[str, OutputRole] = {}
    for name, role in items:
        if name in roles:
            raise UsageError(f"output role for '{name}' given twice")
        roles[name] = role if isinstance(role, OutputRole) else parse_role(str(role))
    return roles


def recipe_roles(path) -> dict[str, str]:
    """The ``output_roles`` mapping of a recipe written as ``{pipeline: [...], output_roles: {...}}``."""
    from .spec import recipe_settings

    roles = recipe_settings(path).get("output_roles")
    if roles is None:
        return {}
    if not isinstance(roles, dict):
        raise UsageError(f"recipe {path}: output_roles must map output names to roles")
    return {str(k): str(v) for k, v in roles.items()}


# ---------------------------------------------------------------------------------------------
# Inference

_SHAPE_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast"}
_SCORE_NAME = re.compile(r"logit|score|prob|class|cls", re.IGNORECASE)
_EMBED_NAME = re.compile(r"embed|pooler|sentence|feature|vector", re.IGNORECASE)
_STATE_NAME = re.compile(r"(?<!hidden_)state|cache|past|present", re.IGNORECASE)
MAX_CLASSES = 100_000


def producers(model) -> dict[str, str]:
    """For each graph output: the op that computes it, looking through shape-only ops."""
    found = {}
    if model is None:
        return found
    for value in model.graph.outputs:
        node = value.producer()
        while node is not None and node.op_type in _SHAPE_OPS and node.inputs and node.inputs[0] is not None:
            node = node.inputs[0].producer()
        found[value.name] = node.op_type if node is not None else "graph input or constant"
    return found


DECISION_ROLES = ("scores", "sequence", "probability", "boxes")


def infer_role(name: str, samples: list[np.ndarray], producer: str | None = None,
               shaped_like: str | None = None) -> OutputRole:
    """The role of an undeclared output from its reference values, name and producing op.
    ``shaped_like`` names an input of the same shape and dtype (a state the caller may feed
    back): such an output never gets a decision metric."""
    if shaped_like is not None and (_STATE_NAME.search(name) or _STATE_NAME.search(shaped_like)):
        return OutputRole("state", False, f"shaped like input '{shaped_like}' and named like a state: "
                                          "a recurrent state fed back, numeric checks only")
    inferred = _infer(name, samples, producer)
    if shaped_like is not None and inferred.role in DECISION_ROLES:
        return OutputRole("state", False, f"shaped like input '{shaped_like}' (may be fed back): numeric checks "
                                          f"only, not {inferred.role}")
    return inferred


def _infer(name: str, samples: list[np.ndarray], producer: str | None) -> OutputRole:
    def role(kind: str, why: str, **params) -> OutputRole:
        return OutputRole(kind, False, why, params)

    if not samples or samples[0].dtype.kind not in "f":
        return role("raw", "not a float tensor: compared value by value")
    first = samples[0]
    shape, rank = first.shape, first.ndim
    where = f"produced by {producer}" if producer else ""
    if rank in (2, 3) and 2 <= shape[-1] <= MAX_CLASSES and producer in ("Softmax", "LogSoftmax"):
        kind = "scores" if rank == 2 else "sequence"
        return role(kind, f"{where} over the last axis ({_shape_text(shape)})")
    if rank in (2, 3) and 2 <= shape[-1] <= MAX_CLASSES and _rows_are_distributions(samples):
        kind = "scores" if rank == 2 else "sequence"
        return role(kind, f"every row is a probability distribution ({_shape_text(shape)})")
    boxes = _box_layout(samples)
    if boxes is not None:
        return role("boxes", f"{_shape_text(shape)} with 4 box columns and scores in [0, 1]: layout {boxes[0]} "
                             f"({boxes[1]})", layout=boxes[0])
    if _is_probability(samples):
        return role("probability", f"one value in [0, 1] per sample on every feed{', ' + where if where else ''}")
    if rank == 2 and 2 <= shape[-1] <= MAX_CLASSES and _SCORE_NAME.search(name) and not _EMBED_NAME.search(name):
        return role("scores", f"named like class scores ('{name}', {_shape_text(shape)})")
    if rank == 3 and 2 <= shape[-1] <= MAX_CLASSES and re.search("logit", name, re.IGNORECASE):
        return role("sequence", f"named like per-step logits ('{name}', {_shape_text(shape)})")
    if rank == 2 and shape[-1] >= 2 and (_EMBED_NAME.search(name) or _unit_rows(samples)):
        why = "every row has unit L2 norm" if _unit_rows(samples) else f"named like an embedding ('{name}')"
        return role("embedding", f"{why} ({_shape_text(shape)})")
    if _STATE_NAME.search(name):
        return role("state", f"named like a carried state ('{name}'): numeric checks only")
    reason = {3: "a [N, T, D] tensor not produced by a softmax: hidden states or features",
              4: "rank 4: a spatial map"}.get(rank, f"{_shape_text(shape)}: no decision evident")
    return role("raw", f"{reason}; cosine, SNR and max abs only (declare a role to add task metrics)")


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _finite(samples) -> bool:
    return all(np.isfinite(s).all() for s in samples)


def _rows_are_distributions(samples) -> bool:
    if not _finite(samples):
        return False
    for s in samples:
        rows = s.reshape(-1, s.shape[-1]).astype(np.float64)
        if rows.size == 0 or rows.min() < 0 or not np.allclose(rows.sum(axis=-1), 1.0, atol=1e-3):
            return False
    return True


def _unit_rows(samples) -> bool:
    if not _finite(samples):
        return False
    return all(s.size and np.allclose(np.linalg.norm(s.reshape(-1, s.shape[-1]).astype(np.float64), axis=-1), 1.0,
                                      atol=1e-3) for s in samples)


def _is_probability(samples) -> bool:
    s = samples[0]
    if s.ndim > 2 or (s.ndim == 2 and s.shape[-1] != 1) or not _finite(samples):
        return False
    return all(x.size and float(x.min()) >= 0.0 and float(x.max()) <= 1.0 for x in samples)


def _box_layout(samples) -> tuple[str, str] | None:
    """(layout, evidence) when a rank-3 output reads as YOLO-style boxes: one short axis of
    5..1029 channels (4 box values and the class scores) against many more anchors, box
    sizes >= 0 and every score in [0, 1]."""
    s = samples[0]
    if s.ndim != 3 or not _finite(samples):
        return None
    rows, cols = s.shape[1], s.shape[2]
    if 5 <= rows <= 1029 and cols >= 4 * rows:
        layout, channels_first = "cxa", True
    elif 5 <= cols <= 1029 and rows >= 4 * cols:
        layout, channels_first = "aoc", False
    else:
        return None
    for x in samples:
        table = x.transpose(0, 2, 1) if channels_first else x  # [N, A, K]
        sizes, scores = table[..., 2:4], table[..., 4:]
        if sizes.min() < 0 or scores.min() < 0 or scores.max() > 1:
            return None
        if float(np.abs(table[..., :4]).max()) <= 1.0 and float(scores.max()) == 0.0:
            return None  # nothing that looks like a detection at all
    evidence = ("channels first, as YOLOv8 exports" if channels_first
                else "anchors first; column 4 read as objectness as YOLOv5 exports (declare layout=ac if not)")
    return layout, evidence


def resolve_roles(declared: dict[str, OutputRole], output_names: list[str], reference: dict[str, list],
                  model=None, feed: dict[str, np.ndarray] | None = None) -> dict[str, OutputRole]:
    """Every output's role: the declared one, else inferred. Declaring an unknown output fails."""
    unknown = [n for n in declared if n not in output_names]
    if unknown:
        raise UsageError(f"--output-role names '{unknown[0]}', which is not an output; outputs: "
                         f"{', '.join(output_names)}")
    made_by = producers(model)
    inputs = {(a.shape, a.dtype): n for n, a in (feed or {}).items()}
    roles = {}
    for name in output_names:
        if name in declared:
            role = declared[name]
            roles[name] = OutputRole(role.role, True, role.why or "declared", role.params, role.floors)
        else:
            samples = reference.get(name) or []
            like = inputs.get((samples[0].shape, samples[0].dtype)) if samples else None
            roles[name] = infer_role(name, samples, made_by.get(name), like)
    return roles
