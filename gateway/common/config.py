"""Typed configuration from TOML, with errors that name the file, the key and what was expected.

Every section of the gateway's config and every probe profile is a dataclass; ``build`` turns a
TOML table into one, checking each key against the dataclass's type hints. Unknown keys are errors
(a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from gateway.common.model import check_field

T = TypeVar("T")


class ConfigError(ValueError):
    """A config or profile problem, phrased for the person who edits the file."""

    def __init__(self, source: str | Path, key: str, expected: str) -> None:
        self.source = str(source)
        self.key = key
        self.expected = expected
        where = f"{self.source}: {key}" if key else self.source
        super().__init__(f"{where}: {expected}")


class KeyProblem(ValueError):
    """Raised by a section's ``__post_init__`` check to name the key at fault (relative to the
    section); ``build`` turns it into a ConfigError with the full key."""

    def __init__(self, key: str, expected: str) -> None:
        super().__init__(f"{key}: {expected}")
        self.key = key
        self.expected = expected


def check_reading_field(key: str, name: str, value: str) -> None:
    """A setting that becomes the Reading field ``name`` (e.g. a slave's ``sensor_id`` becomes
    ``sensorId``) obeys the same limits as readings that arrive: KeyProblem if it does not."""
    problem = check_field(name, value)
    if problem is not None:
        raise KeyProblem(key, problem.detail.removeprefix(f"{name}: "))


# One file may configure both services; each reads its own sections and knows the other's names,
# so a misspelt section is an error in either.
GATEWAY_SECTIONS = frozenset(
    {"gateway", "modbus", "mqtt", "calibration", "deadletter", "buffer", "kafka", "http"}
)
PROCESSOR_SECTIONS = frozenset({"processor", "influxdb", "ml", "notifications"})
SHARED_SECTIONS = frozenset({"validation", "alarms"})


def check_sections(data: dict[str, Any], source: str | Path) -> None:
    known = GATEWAY_SECTIONS | PROCESSOR_SECTIONS | SHARED_SECTIONS
    for name, table in data.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            expected = ", ".join(sorted(known))
            raise ConfigError(source, name, f"unknown section{hint}; expected one of: {expected}")
        if not isinstance(table, dict):
            raise ConfigError(source, name, f"expected a table ([{name}])")


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(p, "", "file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(p, "", f"not valid TOML ({e})") from None


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    if origin is dict:
        return f"a table of {_describe(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, source: str | Path, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(source, key, f"expected {_describe(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        for a in args:
            try:
                return _convert(a, value, source, key)
            except ConfigError:
                continue
        raise ConfigError(source, key, f"expected {_describe(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected {_describe(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_convert(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected {_describe(tp)}, got {value!r}")
        _, item = get_args(tp)
        return {k: _convert(item, v, source, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"expected a table, got {value!r}")
        return build(typing.cast(type, tp), value, source=source, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(source, key, f"expected {_describe(tp)}, got {value!r}")


def build(cls: type[T], data: dict[str, Any], *, source: str | Path, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a TOML table, or raise ConfigError naming the bad key.

    Fields marked ``SECRET`` must hold a reference (env:, file:, cred:) unless the table sets
    ``allow_plaintext_secrets = true``.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls)) if f.init}
    secrets = [name for name, f in fields.items() if f.metadata.get("secret")]
    allow_plaintext = False
    if secrets and ALLOW_PLAINTEXT in data:
        full = f"{prefix}.{ALLOW_PLAINTEXT}" if prefix else ALLOW_PLAINTEXT
        allow_plaintext = _convert(bool, data[ALLOW_PLAINTEXT], source, full)
        data = {k: v for k, v in data.items() if k != ALLOW_PLAINTEXT}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        name = raw_key.replace("-", "_")
        full = f"{prefix}.{raw_key}" if prefix else raw_key
        if name not in fields:
            names = [*fields, ALLOW_PLAINTEXT] if secrets else list(fields)
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(sorted(names))
            raise ConfigError(source, full, f"unknown key{hint}; expected one of: {known}")
        kwargs[name] = _convert(hints[name], value, source, full)
    for name in [] if allow_plaintext else secrets:
        value = kwargs.get(name)
        if isinstance(value, str) and value and not value.startswith(SECRET_REFERENCES):
            full = f"{prefix}.{name}" if prefix else name
            raise ConfigError(source, full, _plaintext_refused(prefix))
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            full = f"{prefix}.{name}" if prefix else name
            raise ConfigError(source, full, f"required key is missing ({_describe(hints[name])})")
    try:
        obj = cls(**kwargs)
    except KeyProblem as e:
        raise ConfigError(source, f"{prefix}.{e.key}" if prefix else e.key, e.expected) from None
    except ValueError as e:  # __post_init__ checks
        raise ConfigError(source, prefix, str(e)) from None
    return obj


# Field metadata of a setting that holds a secret: ``field(default="", metadata=SECRET)``.
SECRET = types.MappingProxyType({"secret": True})
SECRET_REFERENCES = ("env:", "file:", "cred:")
ALLOW_PLAINTEXT = "allow_plaintext_secrets"


def _plaintext_refused(section: str) -> str:
    where = f"[{section}]" if section else "its section"
    return (
        "a reference to the secret, not the secret itself: env:NAME (an environment variable), "
        "file:/path (a file only the service may read) or cred:NAME (a systemd credential, "
        f"LoadCredential=); a plain-text secret is refused unless {where} sets "
        f"{ALLOW_PLAINTEXT} = true"
    )


def secret(value: str, *, source: str | Path, key: str) -> str:
    """Resolve a secret reference: ``env:NAME``, ``file:/path`` or ``cred:NAME`` (a systemd
    credential, ``$CREDENTIALS_DIRECTORY/NAME``, from the unit's ``LoadCredential=``); plain text is
    returned as is. Files are read at every load, so a reload sees a changed ``file:`` password
    (``cred:`` reads systemd's copy, made when the service starts). The environment is fixed for
    the life of the process: an ``env:`` secret changes only with a restart. Other text is returned
    as is (the config loader refuses it in a file unless the section allows plain-text secrets).

    Secrets belong in the environment or a credential file, never in the config itself or a log.
    """
    if value.startswith("cred:"):
        name = value[5:]
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not name or "/" in name:
            raise ConfigError(source, key, f"a credential name without '/', got {name!r}")
        if not directory:
            raise ConfigError(
                source,
                key,
                f"credential {name}: CREDENTIALS_DIRECTORY is not set (cred: needs a systemd "
                "unit with LoadCredential=)",
            )
        try:
            return (Path(directory) / name).read_text().strip()
        except OSError as e:
            raise ConfigError(
                source, key, f"cannot read credential {name} ({e.strerror})"
            ) from None
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ConfigError(source, key, f"environment variable {name} is not set")
        return os.environ[name]
    if value.startswith("file:"):
        try:
            return Path(value[5:]).read_text().strip()
        except OSError as e:
            raise ConfigError(source, key, f"cannot read credential file ({e.strerror})") from None
    return value
