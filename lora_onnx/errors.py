"""Errors that describe a user's mistake or an impossible request.

Every error raised for bad input derives from :class:`LoraOnnxError`; the CLI prints its message on one
line and exits with :attr:`LoraOnnxError.exit_code`, never with a traceback. Anything else is a bug.
"""

from __future__ import annotations

#: Exit code for a validation whose outputs disagree (the run itself worked).
EXIT_MISMATCH = 1
#: Exit code for a user error: bad input, an impossible request, an unusable provider.
EXIT_USAGE = 2


class LoraOnnxError(Exception):
    """A problem with the user's input or request, explained in one line."""

    exit_code = EXIT_USAGE


class ModelLoadError(LoraOnnxError):
    """The model file is missing, unreadable, not ONNX, or lacks its external data."""


class TargetError(LoraOnnxError):
    """Target or exclude patterns select nothing, or select something that cannot take a branch."""


class AdapterError(LoraOnnxError):
    """An adapter (PEFT folder or adapter file) does not fit the model or is not supported."""


class FoldError(LoraOnnxError):
    """A branch cannot be folded into its base weight."""


class ProviderError(LoraOnnxError):
    """An execution provider was requested but is not usable."""


class OutputError(LoraOnnxError):
    """The output path is unsafe (it is an input) or cannot be written."""
