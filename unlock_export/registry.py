"""What every plug-in registry shares (export forms: export.forms.FORMS; engines:
evaluation.engines.ENGINES): a name maps to "module:attribute" (relative to the registry's package,
imported on first use, so reading the names loads nothing heavy) or to the plug-in itself."""

from __future__ import annotations

import importlib

from .errors import UserError


def lookup(entries: dict, name: str, package: str, kind: str):
    """The plug-in registered in `entries` as `name`, or a one-line refusal naming the `kind` and the choices."""
    if name not in entries:
        raise UserError(f"unknown {kind} '{name}': use {' or '.join(entries)}")
    entry = entries[name]
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = getattr(importlib.import_module(module, package), attribute)
    return entry
