"""Renders docs/configuration.md from the pydantic schema, so each default is written once, in config.py.

``python -m extauth.configdoc docs/configuration.md`` (``make docs``) rewrites it; ``--check`` exits 1
when the file is stale.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from extauth.config import Config

REGENERATE = "make docs  (or: python -m extauth.configdoc docs/configuration.md)"

_INTRO = """\
# Configuration reference

<!-- Generated from extauth/config.py by `make docs`; edit the Field descriptions there, not this file. -->

One YAML file, validated at start; `extauth check-config -c FILE` validates it (and loads its key
material) without serving. A full example is [examples/extauth.yaml](../examples/extauth.yaml).
Key names are a contract: keys are added, never renamed.

Validation refuses what `serve` could not use, and every error names the key path
(`policies[0].jwt.issuer`): unknown keys, a key given twice in one mapping, a store URL that does
not parse (the message never quotes the URL, nor a YAML error the offending line), infinity or NaN,
and values outside the limits below. Which keys a reload can change is in
[operations.md](operations.md#hot-reload).
"""


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", path.lower())


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The nested model a field holds (directly, optionally or as list items), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _type(annotation: Any, anchors: dict[type[BaseModel], str]) -> str:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _type(get_args(annotation)[0], anchors)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type(a, anchors) for a in get_args(annotation) if a is not type(None))
    if origin is list:
        item = get_args(annotation)[0]
        inner = _type(item, anchors)
        return f"list of ({inner})" if get_origin(item) in (Union, types.UnionType) else f"list of {inner}"
    if origin is dict:
        key, value = get_args(annotation)
        return f"map of {_type(key, anchors)} to {_type(value, anchors)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[mapping](#{_anchor(anchors[annotation])})"
    return getattr(annotation, "__name__", str(annotation))


def _limits(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        if isinstance(m, at.Ge):
            out.append(f"≥ {m.ge}")
        elif isinstance(m, at.Gt):
            out.append(f"> {m.gt}")
        elif isinstance(m, at.Le):
            out.append(f"≤ {m.le}")
        elif isinstance(m, at.Lt):
            out.append(f"< {m.lt}")
        elif isinstance(m, at.MinLen):
            out.append(f"at least {m.min_length} item{'s' if m.min_length != 1 else ''}"
                       if field.annotation is not str else f"at least {m.min_length} character")
        elif getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return ", ".join(out)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def _sections(model: type[BaseModel], path: str,
              paths: dict[type[BaseModel], list[str]] | None = None) -> dict[type[BaseModel], list[str]]:
    """Every model nested in ``model`` (itself first, then depth first) and the key paths it is at."""
    paths = {} if paths is None else paths
    paths.setdefault(model, []).append(path)
    for name, field in model.model_fields.items():
        nested = _model_of(field.annotation)
        if nested is not None:
            child = f"{path}.{name}" if path else name
            child += "[]" if get_origin(field.annotation) is list else ""
            if nested in paths:
                paths[nested].append(child)
            else:
                _sections(nested, child, paths)
    return paths


def missing_descriptions() -> list[str]:
    """Key paths without a ``description=``."""
    return [f"{path}.{name}" if path else name
            for model, (path, *_) in _sections(Config, "").items()
            for name, field in model.model_fields.items() if not field.description]


def render() -> str:
    parts = [_INTRO]
    sections = _sections(Config, "")
    anchors = {model: paths[0] for model, paths in sections.items()}
    for model, (path, *others) in sections.items():
        title = path or "Top-level keys"
        parts.append(f"\n## {title}\n")
        if others:
            parts.append(f"\nAlso at {', '.join(f'`{o}`' for o in others)}.\n")
        doc = (model.__doc__ or "").strip().split("\n\n")[0]
        if doc:
            parts.append(f"\n{' '.join(doc.split())}\n")
        parts.append("\n| key | type | default | limits | description |\n|---|---|---|---|---|\n")
        for name, field in model.model_fields.items():
            cells = (f"`{name}`", _type(field.annotation, anchors), _default(field), _limits(field),
                     field.description or "")
            parts.append("| " + " | ".join(_md(c) if i > 1 else c for i, c in enumerate(cells)) + " |\n")
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extauth.configdoc", description=__doc__)
    parser.add_argument("path", type=Path, help="the Markdown file, e.g. docs/configuration.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date")
    args = parser.parse_args(argv)
    if missing := missing_descriptions():
        print(f"config keys without a description= in extauth/config.py: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    text = render()
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.exists() else ""
        if current != text:
            print(f"{args.path} is stale; regenerate it: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    args.path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
