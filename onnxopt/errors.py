"""Typed errors raised by onnxopt. The CLI maps them to exit codes; the library only raises."""

from __future__ import annotations


class OnnxoptError(Exception):
    """Base of every error onnxopt raises on purpose."""

    exit_code = 2


class UsageError(OnnxoptError):
    """The request itself is wrong: unknown pass, unknown option, bad value, bad flag."""


class InputError(OnnxoptError):
    """A model or data file is unreadable, unsafe or malformed."""


class UnsafeExternalDataError(InputError):
    """An external-data reference points outside the model's directory."""


class ValidationFailed(OnnxoptError):
    """Outputs differ beyond tolerance or budget; the report says where."""

    exit_code = 1


class PassCrashed(OnnxoptError):
    """A pass raised an unexpected exception; a reproducer was written."""

    exit_code = 1

    def __init__(self, message: str, reproducer: str | None = None):
        super().__init__(message)
        self.reproducer = reproducer
