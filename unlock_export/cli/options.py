"""Click options generated from the library's settings (RuntimeOptions), so a flag's name, default,
type and help are defined once, in the field."""

from __future__ import annotations

import typing

import click
from pydantic import ValidationError

from ..errors import UserError
from ..models.runtime import RuntimeOptions

RUNTIME_FIELDS = tuple(RuntimeOptions.model_fields)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option(name: str, field) -> typing.Callable:
    annotation = field.annotation
    help_text = field.description
    if annotation is bool:
        return click.option(_flag(name), name, is_flag=True, default=field.default, help=help_text)
    args = typing.get_args(annotation)
    if int in args and type(None) in args:  # Optional[int]
        return click.option(_flag(name), name, type=int, default=field.default, help=help_text)
    default = None if field.default is None else str(field.default)
    return click.option(_flag(name), name, default=default, show_default=default is not None, help=help_text)


def runtime_options(fn):
    """Add one flag per RuntimeOptions field; the command receives them as keyword arguments."""
    for name in reversed(RUNTIME_FIELDS):
        fn = _option(name, RuntimeOptions.model_fields[name])(fn)
    return fn


def runtime_from(kwargs: dict) -> RuntimeOptions:
    """Pop the runtime flags out of a command's keyword arguments as one RuntimeOptions; a bad value is a
    one-line error naming the flag."""
    values = {name: kwargs.pop(name) for name in RUNTIME_FIELDS if name in kwargs}
    try:
        return RuntimeOptions(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        raise UserError(f"{_flag(name)} '{values.get(name)}': {err['msg']}") from None


def flag_param(flag) -> tuple[str, str]:
    """(the flag, the parameter the command receives it as) for "--flag" or ("--flag", "param")."""
    return flag if isinstance(flag, tuple) else (flag, flag.lstrip("-").replace("-", "_"))


def settings_options(settings: type, flags: dict, lead: str = "", types: dict | None = None):
    """Click options for fields of a settings dataclass (unlock_export.settings), each with the field's
    one default and help. `flags`: field -> "--flag" (the command receives it under the flag's name) or
    ("--flag", "param"); `types`: field -> a click type where the field's own is not what the flag reads
    (a comma list, a number or 'auto'), whose default is then the field's as text; `lead` prefixes
    each help ("gated-lora: ")."""
    import dataclasses

    found = {f.name: f for f in dataclasses.fields(settings)}

    def decorate(fn):
        for name, flag in reversed(list(flags.items())):
            flag, param = flag_param(flag)
            field = found[name]
            kind = (types or {}).get(name)
            value = field.default
            if isinstance(value, bool):
                fn = click.option(flag, param, is_flag=True, default=value, help=lead + field.metadata.get("help", ""))(fn)
                continue
            if kind is None:
                kind = type(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str
            elif kind is str and value is not None and not isinstance(value, str):
                value = f"{value:g}" if isinstance(value, float) else ",".join(f"{v:g}" for v in value)
            fn = click.option(flag, param, default=value, type=kind, show_default=value is not None,
                              help=lead + field.metadata.get("help", ""))(fn)
        return fn

    return decorate


def given_options(ctx: click.Context, flags) -> list[str]:
    """Which of `flags` the command line gave (not their defaults), for refusing options that do not apply."""
    from click.core import ParameterSource

    given = []
    for flag in flags:  # "--flag", or ("--flag", "param") as settings_options takes them
        flag, name = flag_param(flag)
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT):
            given.append(flag)
    return given


def choice(values) -> click.Choice:
    """A click choice from the library's own constant (so the CLI never lists choices of its own)."""
    return click.Choice(list(values))


class RegistryChoice(click.Choice):
    """A click choice read from a registry each time it is asked (so a plug-in registered after the CLI
    was built is a choice too), after any fixed `extra` values such as 'auto'."""

    def __init__(self, names: typing.Callable[[], typing.Iterable[str]], extra: tuple[str, ...] = ()):
        self._names, self._extra = names, tuple(extra)
        super().__init__([])

    @property
    def choices(self):
        return (*self._extra, *self._names())

    @choices.setter
    def choices(self, _value):  # click.Choice.__init__ sets it; the registry is the only source
        pass


def form_choice() -> RegistryChoice:
    """The export forms registered in export.forms (FORMS)."""
    from ..export.forms import form_names

    return RegistryChoice(form_names)


def form_help(lead: str) -> str:
    """`lead`, then each registered export form and what it writes, from its plug-in's summary."""
    from ..export.forms import FORMS, form

    return lead + " " + "; ".join(f"{name}: {form(name).summary}" for name in FORMS) + "."


def engine_choice(extra: tuple[str, ...] = ()) -> RegistryChoice:
    """The engines registered in evaluation.engines (ENGINES)."""
    from ..evaluation.engines import engine_names

    return RegistryChoice(engine_names, extra)


def engine_help(lead: str) -> str:
    """`lead`, then each registered engine and what it serves, from its plug-in's summary."""
    from ..evaluation.engines import ENGINES, plugin

    return lead + " " + "; ".join(f"{name}: {plugin(name).summary}" for name in ENGINES) + "."


def converter_choice(reads: str) -> RegistryChoice:
    """The converters registered in export.converters (CONVERTERS) that read `reads`."""
    from ..export.converters import converter_names

    return RegistryChoice(lambda: converter_names(reads))


def converter_help(lead: str, reads: str) -> str:
    """`lead`, then each registered converter that reads `reads` and what it writes."""
    from ..export.converters import converter, converter_names

    return lead + " " + "; ".join(f"{name}: {converter(name).summary}" for name in converter_names(reads)) + "."


def parse_multiplier(text: str) -> float | str:
    """--multiplier: a number, or 'auto' (the gated edit's label-free choice)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--multiplier takes a positive number or 'auto', not {text!r}") from None


def chat_options(fn):
    """--chat and --system: prompts wrapped by each model's own chat template."""
    fn = click.option("--system", default=None,
                      help="--chat: the system turn (for `key`, of both variants; --locked-system / --unlocked-system "
                           "for one).")(fn)
    return click.option("--chat", is_flag=True,
                        help="Wrap each prompt in the model's own chat template (the user's turn, then the "
                             "assistant's turn opened), as a chat endpoint serves it.")(fn)
