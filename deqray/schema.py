"""How deqray checks what it reads: pydantic over plain dataclasses, errors in deqray's words.

The types are stdlib dataclasses: the experiment's sections (deqray.config), a
task's data section, the study file (deqray.tune.study_schema). A field's
annotation holds its type, its bounds and its doc in one place
(`Annotated[int, Field(ge=1, description=...)]`); pydantic validates them and
writes the JSON Schema that editors check YAML files with
(`deqray schema experiment|study`).

Everything is validated under `_Root`, whose config is STRICT: pydantic gives a
dataclass without a config of its own the config of the one holding it, so
every section, a task's and a user's classes included, rejects unknown keys
and takes no implicit conversion. YAML has typed each value already: "3" is
no int, `true` is no 1, `100.0` is no step count; only an int is taken for a
float (and made one). The data go in as JSON text: pydantic's strict mode
takes a JSON object for a dataclass (a Python dict it would refuse), a JSON
array for a list or a tuple, and a YAML file holds no more than JSON does
(its dates become ISO strings, its non-string keys strings).

`validate` turns pydantic's first error into a ConfigError naming the file or
the override that set the key, the dotted key, and the nearest valid key
(difflib) or the expected type with its bounds.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Generic, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.errors import PydanticInvalidForJsonSchema, PydanticSchemaGenerationError

from deqray.core._errors import suggest

# the docstring under a field is its description in the JSON Schema
STRICT = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


T = TypeVar("T")


@dataclasses.dataclass
class _Root(Generic[T]):
    __pydantic_config__ = STRICT  # inherited by every dataclass under `value` lacking its own
    value: T


def _build_adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(_Root[tp])


_cached_adapter = functools.lru_cache(maxsize=256)(_build_adapter)


def _adapter(tp: Any) -> TypeAdapter:
    try:
        return _cached_adapter(tp)
    except TypeError:  # an unhashable annotation (a Literal of lists, say): build it each time
        return _build_adapter(tp)


def _run(tp: Any, data: Any) -> Any:
    text = json.dumps({"value": _plain(data)})
    return _adapter(tp).validate_json(text, strict=True).value


def _plain(value: Any) -> Any:
    """`value` as JSON holds it: mappings with string keys, lists, and scalars."""
    if isinstance(value, dict):
        return {_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return str(value)


def _key(k: Any) -> str:
    """A mapping key as JSON spells it (true, null, 1.5)."""
    if isinstance(k, str):
        return k
    return json.dumps(k) if k is None or isinstance(k, bool) else str(k)


def validate(
    tp: Any,
    data: Any,
    key: str = "",
    where: str | None = None,
    origin: Mapping[str, str] | None = None,
) -> Any:
    """`data` validated as `tp` (a dataclass from a mapping, or any annotation).

    `key` is the dotted key where `data` sits in its file. A ConfigError starts
    with the entry of `origin` ({dotted key: "override k=v"}) that set the
    failing key, else with `where`, else (None) with the key itself.
    """
    try:
        return _run(tp, data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        error = errors[0]
        loc = tuple(error["loc"][1:])  # without _Root's "value"
        if error["type"] not in _UNKNOWN_KEY:
            loc = loc[: locate(tp, loc)[1]]
            # at a union, a member's complaint about the value (inf is no finite float) says
            # more than another member's type mismatch
            at = (error["loc"][0], *loc)
            telling = [
                x
                for x in errors
                if tuple(x["loc"][: len(at)]) == at
                and not x["type"].endswith(("_type", "_parsing"))
                and x["type"] not in ("literal_error", "missing", *_UNKNOWN_KEY)
            ]
            error = telling[0] if telling and len(at) < len(error["loc"]) else error
        prefix = tuple(key.split(".")) if key else ()
        text = _explain(error, tp, loc, prefix)
        src = source_of(_dotted((*prefix, *loc)), origin or {}, where)
        raise ConfigError(f"{src}: {text}" if src else text) from None


def json_schema(tp: Any, title: str, description: str = "") -> dict:
    """The JSON Schema (draft 2020-12) of `tp`: what a YAML language server checks against."""
    full = _adapter(tp).json_schema()
    defs = full.get("$defs", {})
    root = full["properties"]["value"]
    if "$ref" in root:  # the type itself, inlined at the top (its definition stays for refs)
        root = defs[root["$ref"].rsplit("/", 1)[1]]
    out = {"$schema": JSON_SCHEMA_DIALECT, **root, "title": title}
    if description:
        out["description"] = description
    if defs:
        out["$defs"] = defs
    return out


def source_of(key: str, origin: Mapping[str, str], where: str | None) -> str | None:
    """The override that set `key` (or a section above or below it), else `where`."""
    for k, o in origin.items():
        if key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + "."):
            return o
    return where


def field_types(tp: Any, bounds: bool = True) -> dict[str, Any]:
    """Field name -> annotation of a dataclass, or of a parametrized generic one; with
    `bounds`, the Annotated constraints kept."""
    cls = typing.get_origin(tp) or tp
    hints = typing.get_type_hints(cls, include_extras=bounds)
    given = dict(zip(getattr(cls, "__parameters__", ()), typing.get_args(tp), strict=False))
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, TypeVar):
            default = getattr(hint, "__default__", None)
            hint = given.get(hint, default if isinstance(default, type) else hint.__bound__)
        out[f.name] = hint
    return out


def locate(tp: Any, loc: tuple) -> tuple[Any, int]:
    """The annotation at a pydantic error location inside `tp` (None where it cannot tell),
    and how many parts of `loc` are keys or indices: at a union, pydantic adds the tag of
    the member it tried, so the walk stops there and the message names the whole union."""
    for i, part in enumerate(loc):
        tp = unwrap(tp)
        cls = typing.get_origin(tp) or tp
        if _is_dataclass(tp):
            tp = field_types(tp).get(part)
            if tp is None:
                return None, len(loc)
        elif cls in (list, tuple) and isinstance(part, int):
            tp = (typing.get_args(tp) or (Any,))[0]
        elif cls in (dict, Mapping) and part != "[key]":
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else Any
        elif cls in (typing.Union, types.UnionType):
            return tp, i
        else:  # inside a free value, or a mapping's key ("[key]")
            return None, i if part == "[key]" else len(loc)
    return tp, len(loc)


def type_name(hint: Any) -> str:
    """A type as messages name it, from its JSON Schema (bounds included): 'int >= 1 | null'."""
    try:
        return _describe(TypeAdapter(hint).json_schema())
    except (PydanticInvalidForJsonSchema, PydanticSchemaGenerationError):
        return getattr(hint, "__name__", str(hint))


def accepts(hint: Any, value: Any) -> bool:
    """Whether a field annotated `hint` takes `value` (the same rules as `validate`)."""
    try:
        _run(hint, value)
    except ValidationError:
        return False
    return True


# --------------------------------------------------------------------------- #
# pydantic's errors in deqray's words
# --------------------------------------------------------------------------- #

_BOUNDS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}
_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument", "invalid_key")
_SECTION_ERRORS = ("dataclass_type", "dataclass_exact_type", "dict_type", "model_type")
_JSON_TYPES = {
    "integer": "int",
    "number": "float",
    "boolean": "bool",
    "string": "str",
    "null": "null",
    "array": "list",
    "object": "mapping",
}


def _explain(error: dict, tp: Any, loc: tuple, prefix: tuple) -> str:
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    full = _dotted((*prefix, *loc)) or "(top)"
    if kind in _UNKNOWN_KEY and loc:
        section = unwrap(locate(tp, loc[:-1])[0])
        names = list(field_types(section)) if _is_dataclass(section) else []
        owner = getattr(typing.get_origin(section) or section, "owner", "")  # a task's section
        parent = _dotted((*prefix, *loc[:-1]))
        unknown = f"{parent}.{loc[-1]}" if parent else str(loc[-1])
        return (
            f"unknown key {unknown!r}{suggest(loc[-1], names)}; valid keys"
            f"{' of ' + parent if parent else ''}{f' (task {owner})' if owner else ''}: "
            f"{', '.join(names)}"
        )
    if kind == "missing":
        doc = _field_doc(unwrap(locate(tp, loc[:-1])[0]), loc[-1]) if loc else ""
        return f"{full}: missing" + (f" ({doc[:1].lower()}{doc[1:].rstrip('.')})" if doc else "")
    if kind in _BOUNDS:
        op, name = _BOUNDS[kind]
        return f"{full}: must be {op} {_show(ctx[name])}, got {_show(value)}"
    if kind in ("value_error", "assertion_error"):
        return f"{full}: {ctx.get('error', error['msg'])}"
    hint = locate(tp, loc)[0]
    mismatch = kind.endswith(("_type", "_parsing")) or kind == "literal_error"
    if kind in _SECTION_ERRORS or (mismatch and _is_dataclass(unwrap(hint))):
        return f"{full}: expected a section (mapping), got {value!r}"
    if hint is None or not mismatch:  # too short, not finite, ...: pydantic's words
        msg = error["msg"]
        return f"{full}: {msg[:1].lower()}{msg[1:]}, got {value!r}"
    message = f"{full}: expected {type_name(hint)}, got {value!r}"
    if kind == "literal_error" and isinstance(value, str):
        message += suggest(value, [str(v) for v in _enum(hint)])
    return message


def _field_doc(section: Any, name: Any) -> str:
    """The first sentence of a field's doc (its description in the JSON Schema)."""
    if not _is_dataclass(section):
        return ""
    try:
        props = json_schema(section, "")["properties"]
    except (PydanticInvalidForJsonSchema, PydanticSchemaGenerationError):
        return ""
    doc = " ".join(props.get(name, {}).get("description", "").split())
    return doc.split(". ")[0]


def _describe(js: dict) -> str:
    if "anyOf" in js:
        return " | ".join(_describe(s) for s in js["anyOf"])
    if "enum" in js:
        return " | ".join(repr(v) for v in js["enum"])
    if "const" in js:
        return repr(js["const"])
    kind = js.get("type")
    text = _JSON_TYPES.get(kind, "any") if isinstance(kind, str) else "any"
    if kind == "array" and "items" in js:
        text = f"list of {_describe(js['items'])}"
    bounds = [
        f"{op} {_show(js[k])}"
        for k, op in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        )
        if k in js
    ]
    return " ".join([text, " and ".join(bounds)]) if bounds else text


def _enum(hint: Any) -> list:
    try:
        js = TypeAdapter(hint).json_schema()
    except (PydanticInvalidForJsonSchema, PydanticSchemaGenerationError):
        return []
    return [v for s in js.get("anyOf", [js]) for v in s.get("enum", [])]


def unwrap(tp: Any) -> Any:
    """Annotated[X, ...] -> X, and X | None -> X (what a section field's type is)."""
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return unwrap(rest[0])
    return tp


def _is_dataclass(tp: Any) -> bool:
    cls = typing.get_origin(tp) or tp
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def _dotted(parts: tuple) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return repr(v) if isinstance(v, str) else str(v)


__all__ = [
    "STRICT",
    "ConfigError",
    "accepts",
    "field_types",
    "json_schema",
    "locate",
    "source_of",
    "type_name",
    "unwrap",
    "validate",
]
