"""``--section.key value`` overrides onto nested frozen dataclasses, checked against types."""

import dataclasses
import types
import typing
from typing import Any


def field_names(config: Any, prefix: str = "") -> list[str]:
    """Every overridable dotted key of a (nested) dataclass instance."""
    names = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            names.extend(field_names(value, f"{prefix}{f.name}."))
        elif f.init:
            names.append(prefix + f.name)
    return names


def parse_overrides(config: Any, overrides: dict[str, str]) -> dict:
    """The nested dict of changes that dotted ``key: text`` overrides make to ``config``
    (a nested dataclass instance), each text parsed to its field's type.

    Nothing is built or validated here: merge the dict onto the config's own dict and build
    the config once, so that checks across fields (``data.seq_len`` against
    ``model.max_seq_len``) see the finished values whatever the order of the overrides.

    Raises:
        KeyError: an unknown key, listing the valid ones.
        ValueError: a value that does not parse as its field's type; a key given both as a
            value and with sub-keys.
    """
    changes: dict = {}
    for key, text in overrides.items():
        node, target, prefix = changes, config, ""
        *parents, name = key.split(".")
        for part in parents:
            child = getattr(target, _field(target, part, key, prefix).name)
            if not dataclasses.is_dataclass(child):
                raise KeyError(f"unknown config key {key!r}: {part!r} has no sub-keys")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"config key {prefix + part!r} is given with and without sub-keys")
            target, prefix = child, f"{prefix}{part}."
        hint = typing.get_type_hints(type(target))[_field(target, name, key, prefix).name]
        if isinstance(node.get(name), dict):
            raise ValueError(f"config key {key!r} is given with and without sub-keys")
        node[name] = parse_value(text, hint, key)
    return changes


def _field(config: Any, name: str, key: str, prefix: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    if name not in fields:
        valid = ", ".join(field_names(config, prefix))
        raise KeyError(f"unknown config key {key!r}; valid keys: {valid}")
    return fields[name]


def check_types(config: Any) -> None:
    """Check every init field of a dataclass instance against its type hint.

    An ``int`` is accepted (and stored as ``float``) where a ``float`` is expected; a ``bool``
    never passes as an ``int``. Meant for ``__post_init__``, so a config read from JSON fails
    where it enters, naming the key.

    Raises:
        TypeError: ``"<Class>.<field>=<value>: expected <type>"``.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        options = _options(hints[f.name])
        if float in options and type(value) is int and int not in options:
            object.__setattr__(config, f.name, float(value))
            continue
        if not any(_is_instance(value, option) for option in options):
            names = " or ".join(_type_name(o) for o in options)
            raise TypeError(f"{type(config).__name__}.{f.name}={value!r}: expected {names}")


def _type_name(option: Any) -> str:
    return "None" if option is type(None) else getattr(option, "__name__", str(option))


def _options(hint: Any) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _is_instance(value: Any, option: Any) -> bool:
    if option is type(None):
        return value is None
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(option)
    return isinstance(value, origin or option)


def parse_value(text: str, hint: Any, key: str) -> Any:
    """Parse ``text`` as ``hint`` (bool, int, float, str, or an Optional of those)."""
    options = _options(hint)
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    for option in options:
        if option is type(None):
            continue
        try:
            if option is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                return text.lower() in ("true", "1", "yes")
            if option in (int, float, str):
                return option(text)
        except ValueError:
            continue
    names = " or ".join(_type_name(o) for o in options)
    raise ValueError(f"config key {key!r}: cannot read {text!r} as {names}")
