"""Typed dataclass configs with YAML files and ``key=value`` command-line overrides.

A config class is a plain ``@dataclass`` that inherits :class:`BaseConfig`. Entry points call
``MyConfig.from_cli(argv)``; values merge in the order class defaults < yaml file < command line,
through OmegaConf so every value is type-checked against the field's annotation.

Command-line words:

- ``yaml=path/to/file.yml``: a YAML file whose keys are config fields.
- ``field=value``: an override, OmegaConf dot-list syntax (``data_dirs=[a,b]`` works).
- ``help=true``: print every field with its default and exit.

Nothing here runs at import time; nothing reads ``sys.argv`` unless an entry point passes it.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T", bound="BaseConfig")


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message says what to fix."""


def _is_true(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclasses.dataclass
class BaseConfig:
    """Base for project configs. Subclasses add fields; ``yaml_path`` records where values came from."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def split_argv(cls, argv: Sequence[str]) -> tuple[list[str], list[str]]:
        """Split ``argv`` into (config words, everything else).

        Config words are ``yaml=...``, ``help=...`` and ``<field>=...`` for a field of this class
        (a dotted key counts by its first part). Anything else, including free text that happens to
        contain ``=``, is returned untouched for the caller's own parser.
        """
        names = set(cls.field_names()) | {"yaml", "help"}
        ours, rest = [], []
        for word in argv:
            key, sep, _ = word.partition("=")
            if sep and key.split(".")[0] in names:
                ours.append(word)
            else:
                rest.append(word)
        return ours, rest

    @classmethod
    def help_text(cls) -> str:
        lines = [f"{cls.__name__} fields (override with key=value, load a file with yaml=path):"]
        width = max(len(n) for n in cls.field_names())
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = "???"
            doc = f.metadata.get("help", "")
            lines.append(f"  {f.name:<{width}} = {default!r}" + (f"   # {doc}" if doc else ""))
        return "\n".join(lines)

    @classmethod
    def from_cli(cls: type[T], argv: Sequence[str] | None = None, strict: bool = True) -> T:
        """Build a config from command-line words; exits with a message on ``help=true`` or a mistake.

        With ``strict`` every ``key=value`` word must name a field; otherwise unknown words are ignored
        (use :meth:`split_argv` first to keep them).
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        try:
            return cls.parse(argv, strict=strict)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    @classmethod
    def parse(cls: type[T], argv: Sequence[str], strict: bool = True) -> T:
        """Like :meth:`from_cli` but raises :class:`ConfigError` instead of exiting."""
        yaml_path: str | None = None
        overrides: list[str] = []
        for word in argv:
            key, sep, value = word.partition("=")
            if not sep:
                if strict:
                    raise ConfigError(
                        f"unexpected argument {word!r}: config arguments look like key=value "
                        f"(run with help=true to list the fields)"
                    )
                continue
            if key == "help":
                if _is_true(value):
                    print(cls.help_text())
                    raise SystemExit(0)
                continue
            if key == "yaml":
                yaml_path = value
                continue
            if key.split(".")[0] not in cls.field_names():
                if strict:
                    raise ConfigError(_unknown_key_message(cls, key, "on the command line"))
                continue
            overrides.append(word)
        return cls.build(yaml_path, overrides)

    @classmethod
    def build(cls: type[T], yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
        """Merge class defaults < yaml file < dot-list overrides into a validated instance."""
        schema = OmegaConf.structured(cls)
        layers = [schema]
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist (check the yaml= path)")
            try:
                loaded = OmegaConf.load(path)
            except Exception as e:  # yaml syntax errors come in several types
                raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from None
            if not isinstance(loaded, type(schema)) and loaded is not None:
                raise ConfigError(f"config file {str(path)!r} must be a mapping of field: value")
            for key in loaded or {}:
                if key not in cls.field_names():
                    raise ConfigError(_unknown_key_message(cls, str(key), f"in {str(path)!r}"))
            layers.append(cls._lists_from_scalars(loaded, f"in {str(path)!r}"))
        if overrides:
            # A string field takes its value verbatim: YAML would turn "lambda p: p.parts[-2]" into a mapping.
            text_fields = cls._text_fields()
            verbatim = {}
            dotlist = []
            for word in overrides:
                key, _, value = word.partition("=")
                if key in text_fields:
                    optional = text_fields[key]
                    verbatim[key] = None if optional and value in ("null", "~") else _unquote(value)
                else:
                    dotlist.append(word)
            try:
                layers.append(cls._lists_from_scalars(OmegaConf.from_dotlist(dotlist), "on the command line"))
            except OmegaConfBaseException as e:
                raise ConfigError(f"cannot parse overrides {dotlist}: {e}") from None
            layers.append(OmegaConf.create(verbatim))
        try:
            merged = OmegaConf.merge(*layers)
            obj = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            raise ConfigError(_omegaconf_message(e)) from None
        assert isinstance(obj, cls)
        if yaml_path is not None:
            obj.yaml_path = str(yaml_path)  # type: ignore[attr-defined]
        obj.validate()
        return obj

    @classmethod
    def _lists_from_scalars(cls, layer: Any, where: str) -> Any:
        """``data_dirs: /path`` means ``data_dirs: [/path]``: a single string for a list field becomes a
        one-item list; any other non-list value (a number, a mapping) is refused with a plain message."""
        if layer is None:
            return layer
        hints = typing.get_type_hints(cls)
        for key in list(layer.keys()):
            hint = hints.get(str(key))
            if typing.get_origin(hint) is not list:
                continue
            value = layer[key]
            if isinstance(value, str):
                layer[key] = [value]
            elif value is not None and not OmegaConf.is_list(value):
                raise ConfigError(f"config field {key!r} {where} must be a list such as [a, b] (or one string); "
                                  f"got {value!r}")
        return layer

    @classmethod
    def _text_fields(cls) -> dict[str, bool]:
        """String-typed fields, mapped to whether they are optional."""
        hints = typing.get_type_hints(cls)
        return {name: hint != str for name, hint in hints.items() if hint in (str, typing.Optional[str])}

    def validate(self) -> None:
        """Subclasses check value ranges here and raise :class:`ConfigError`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dumps(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _unknown_key_message(cls: type[BaseConfig], key: str, where: str) -> str:
    names = cls.field_names()
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; run with help=true to list the fields"
    return f"unknown config field {key!r} {where}{hint}"


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(e).splitlines()[0]
    if key:
        return f"bad value for config field {key!r}: {msg}"
    return msg


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING) -> Any:
    """``dataclasses.field`` with a one-line ``help`` shown by ``help=true``."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help})
