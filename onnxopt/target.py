"""The CPU a quantized model will run on, and the integer kernels ONNX Runtime has there.

A :class:`Target` names a family of CPUs by the MLAS kernels ORT 1.32 dispatches on them
(``onnxruntime/core/mlas/lib/platform.cpp``) and says which quantization choices fit them.
``detect`` reads a ``/proc/cpuinfo`` text (the runner or the API reads the file; passes
never do); ``resolve`` turns ``auto`` or a name into a target. Passes get the target
through their :class:`~onnxopt.pass_base.PassContext` and take from it the defaults of
options the user left unset (:func:`apply_defaults`); an option set explicitly always wins.

What decides the choices (see docs/targets.md for the sources):

- x86 without VNNI (AVX2, AVX-512 core): u8 x s8 products go through VPMADDUBSW, whose
  int16 sums of pairs saturate when both factors are large (a centred uint8 activation and
  full-range int8 weights). ORT's U8U8 kernels are exact but slower.
- x86 with VNNI (AVX-VNNI, AVX-512 VNNI) and AMX: u8 x s8 accumulates into int32
  (VPDPBUSD, TDPBUSD), no saturation: int8 weights everywhere, no reduced range.
- On x86, ORT converts int8 activation Q/DQ pairs to uint8 (QDQS8ToU8Transformer: MLAS has
  no fast s8 x s8 kernel there, except on AVX-VNNI-INT8): activations stay uint8, asymmetric.
- ARM64: ORT keeps int8 Q/DQ native (``QDQIsInt8Allowed``) and runs s8 x s8 on SDOT (and
  SMMLA with i8mm); nothing saturates: int8 activations and weights, ORT's own defaults.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import UsageError

CPUINFO = Path("/proc/cpuinfo")


@dataclasses.dataclass(frozen=True)
class Target:
    """One CPU family's integer kernels, and how it was chosen."""

    name: str
    summary: str
    arch: str  # "x86", "arm" or "any"
    u8s8_saturates: bool  # u8 x s8 pair sums saturate at int16 (VPMADDUBSW)
    activation_type: str  # what QDQ activations should be: ORT's fast kernel for them
    threads: int = 1  # intra-op threads the model will run with (speed measurements)
    chosen_by: str = "default"
    cpu: str | None = None
    flags: tuple[str, ...] = ()

    @property
    def int8_weights(self) -> bool:
        """Full-range int8 weights with any uint8 activation are exact on this target's kernels."""
        return not self.u8s8_saturates

    def describe(self) -> dict:
        return {"name": self.name, "summary": self.summary, "chosen_by": self.chosen_by, "cpu": self.cpu,
                "flags": list(self.flags), "threads": self.threads}

    # -- defaults of the quantize passes ------------------------------------------------------
    def static_defaults(self) -> dict[str, tuple[object, str]]:
        """quantize-static option -> (value, why) for options left at their target default."""
        if self.arch == "arm":
            act = ("int8", "ORT keeps int8 Q/DQ on ARM and runs s8s8 on SDOT/SMMLA")
        else:
            act = ("uint8", "ORT's x86 kernels take uint8 activations (int8 ones are converted)")
        return {
            "activation_type": act,
            "symmetric_activations": (False, "the kernels take any activation zero point"),
            "reduce_range": (False, "uint8 weights where activations are centred avoid the saturation"
                             if self.u8s8_saturates else "int32 accumulation: no saturation"),
            "weight_type": ("auto", *self._static_weights()),
        }

    def _static_weights(self) -> tuple[str, str]:
        """(why, what ``auto`` means here)."""
        if self.u8s8_saturates:
            return ("u8s8 saturates (VPMADDUBSW): a centred uint8 activation (zero point above 64) gets uint8 "
                    "weights (exact u8u8 kernels), others int8", "uint8 where centred, else int8")
        return "u8s8/s8s8 accumulate in int32: no saturation", "int8"

    def dynamic_defaults(self, weight_type: str) -> dict[str, tuple[object, str]]:
        """quantize-dynamic option -> (value, why); ``weight_type`` is the user's value or ``auto``."""
        if weight_type == "auto":
            weight_type = "uint8" if self.u8s8_saturates else "int8"
        saturating = self.u8s8_saturates and weight_type == "int8"
        return {
            "weight_type": (weight_type, "u8u8 kernels are exact where u8s8 saturates (VPMADDUBSW)"
                            if self.u8s8_saturates else "u8s8 accumulates in int32 (VNNI/AMX/dot product)"),
            "reduce_range": (saturating, "7-bit int8 weights keep u8s8 pair sums inside int16"
                             if saturating else "no u8s8 saturation to avoid"),
        }


def _target(name: str, summary: str, arch: str, saturates: bool, activation: str) -> Target:
    return Target(name, summary, arch, saturates, activation)


TARGETS: dict[str, Target] = {t.name: t for t in (
    _target("generic", "unknown CPU: choices that are exact on every ORT CPU kernel", "any", True, "uint8"),
    _target("avx2", "x86 AVX2 without VNNI (u8s8 via VPMADDUBSW saturates)", "x86", True, "uint8"),
    _target("avx512", "x86 AVX-512 core without VNNI (u8s8 via VPMADDUBSW saturates)", "x86", True, "uint8"),
    _target("avx-vnni", "x86 AVX-VNNI (VPDPBUSD on 256 bits)", "x86", False, "uint8"),
    _target("avx512-vnni", "x86 AVX-512 VNNI (VPDPBUSD on 512 bits)", "x86", False, "uint8"),
    _target("amx", "x86 AMX-INT8 tiles (ORT's u8s8 AMX kernels; VNNI for small GEMMs)", "x86", False, "uint8"),
    _target("arm-neon", "ARM64 NEON without dot product", "arm", False, "int8"),
    _target("arm-dotprod", "ARM64 with dot product (SDOT/UDOT; SMMLA with i8mm)", "arm", False, "int8"),
)}


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """The CPU model name and the ISA flags of a ``/proc/cpuinfo`` text (x86 ``flags``, ARM ``Features``)."""
    model, flags = None, set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and model is None and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, flags


# flags worth printing, in the order they decide
_DECIDING = ("amx_int8", "amx_tile", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "avx512bw", "avx512f", "avx2",
             "i8mm", "asimddp", "asimd")


# (flags that must all be present, target), best first: AMX machines also have AVX-512 VNNI.
_DETECTION = (({"amx_int8", "amx_tile"}, "amx"), ({"avx512_vnni"}, "avx512-vnni"), ({"avx_vnni"}, "avx-vnni"),
              ({"avx512bw"}, "avx512"), ({"avx2"}, "avx2"), ({"asimddp"}, "arm-dotprod"), ({"asimd"}, "arm-neon"))


def detect(cpuinfo: str) -> Target:
    """The target of the CPU a ``/proc/cpuinfo`` text describes (``generic`` when nothing fits)."""
    model, flags = parse_cpuinfo(cpuinfo)
    name = next((name for needed, name in _DETECTION if needed <= flags), "generic")
    shown = tuple(f for f in _DECIDING if f in flags)
    return dataclasses.replace(TARGETS[name], chosen_by="auto", cpu=model, flags=shown)


def read_cpuinfo(path: Path = CPUINFO) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def resolve(spec: str | Target | None = "auto", threads: int | None = None, cpuinfo: str | None = None) -> Target:
    """A target from ``auto`` (this machine, or the given cpuinfo text), a name, or a Target."""
    if isinstance(spec, Target):
        target = spec
    else:
        text = (spec or "auto").strip().lower()
        if text == "auto":
            target = detect(read_cpuinfo() if cpuinfo is None else cpuinfo)
        elif text in TARGETS:
            target = dataclasses.replace(TARGETS[text], chosen_by="--target")
        else:
            raise UsageError(f"unknown target '{spec}'; choose auto or one of {', '.join(TARGETS)}")
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        target = dataclasses.replace(target, threads=threads)
    return target


GENERIC = TARGETS["generic"]


def apply_defaults(options, defaults: dict[str, tuple], target: Target, unset=("auto", None)):
    """``(options, choices)``: each option still at an unset value (``auto``/None) takes the target's
    value. ``defaults`` maps option -> (value, why) or (value, why, shown), ``shown`` being what the
    value means when it is a mode such as ``auto``. ``choices`` maps option -> {value, source, why}."""
    changes, choices = {}, {}
    for name, (value, why, *shown) in defaults.items():
        current = getattr(options, name)
        if current in unset:
            if current != value:
                changes[name] = value
            choices[name] = {"value": shown[0] if shown else _text(value), "source": f"target {target.name}",
                             "why": why}
        else:
            choices[name] = {"value": _text(current), "source": "option", "why": "set explicitly"}
    return dataclasses.replace(options, **changes) if changes else options, choices


def choices_text(choices: dict[str, dict]) -> str:
    """``weight_type=int8, reduce_range=false (target avx512-vnni); activation_type=int8 (option)``."""
    by_source: dict[str, list[str]] = {}
    for name, choice in choices.items():
        by_source.setdefault(choice["source"], []).append(f"{name}={choice['value']}")
    return "; ".join(f"{', '.join(items)} ({source})" for source, items in by_source.items())


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def target_table(cpuinfo: str | None = None) -> dict:
    """Every target with what it chooses for the quantize passes, and what ``auto`` picks here."""
    rows = []
    for t in TARGETS.values():
        static = {f"quantize-static {k}": choice[2] if len(choice) > 2 else _text(choice[0])
                  for k, choice in t.static_defaults().items()}
        dynamic = {f"quantize-dynamic {k}": _text(choice[0]) for k, choice in t.dynamic_defaults("auto").items()}
        rows.append({"name": t.name, "summary": t.summary, "choices": static | dynamic})
    return {"targets": rows, "auto": resolve("auto", cpuinfo=cpuinfo).describe()}
