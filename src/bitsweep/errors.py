"""Errors a user can act on. Each message names what was given and what is known."""

from __future__ import annotations

from collections.abc import Iterable


class BitsweepError(Exception):
    """Base class: a problem with the user's input or environment, reported in one line."""


class ConfigError(BitsweepError):
    """The experiment configuration is invalid; raised before any work runs."""


class SourceError(BitsweepError):
    """A model source cannot be used (missing files, unpinned revision, unsafe format...)."""


class ComparabilityError(BitsweepError):
    """A runner would not be scored on the same tokens or reference as the others."""


class ScreenshotError(BitsweepError):
    """The MLflow UI screenshot cannot be taken (no chromium, the UI did not start or did not render)."""


def unknown(kind: str, name: object, known: Iterable[str]) -> ConfigError:
    """``unknown backend 'onnx'; known: llamacpp, mlx``: the one shape of every 'no such thing' error."""
    return ConfigError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known)) or '(none)'}")
