"""One command-line convention for every script: a dataclass of settings is the command line.

Each field is a flag (`--field-name`), its default is the flag's default and the comment after it (continued on
comment-only lines below it) is its --help text, as in CleanRL. Booleans get `--x / --no-x`; a field whose comment
starts with "{a,b,c}" only takes those values; a list field is a flag that may be given several times.
"""
import argparse
import inspect
import re
import sys
from dataclasses import MISSING, fields

_CHOICES = re.compile(r"^\{([^}]+)\}\s*")


def field_help(settings_class) -> dict:
    """{field name: the comment after it}, read from the class's source; comment-only lines right below a field
    continue its comment."""
    comments, name = {}, None
    for line in inspect.getsource(settings_class).splitlines():
        field = re.match(r"^\s+(\w+): [^#]+#\s*(.+)$", line)
        more = re.match(r"^\s+#\s*(.+)$", line)
        if field:
            name = field.group(1)
            comments[name] = field.group(2).strip()
        elif more and name is not None:
            comments[name] += " " + more.group(1).strip()
        else:
            name = None
    return comments


def build_parser(settings_class, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of `settings_class`."""
    comments = field_help(settings_class)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(settings_class):
        flag = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, "")
        choices = _CHOICES.match(help_text)
        kw = {"choices": choices.group(1).split(",")} if choices else {}
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: a bare % breaks --help
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = str(f.type).replace("typing.", "").replace(" ", "")
        if kind in ("bool", "<class'bool'>", "bool|None"):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind in ("list", "<class'list'>", "list|None"):  # a flag that may be given several times
            parser.add_argument(flag, action="append", default=default, help=help_text)
        else:
            kind = kind.replace("|None", "").replace("<class'", "").replace("'>", "")
            parser.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], default=default,
                                help=help_text, **kw)
    return parser


def parse(settings_class, description: str, argv=None, presets: dict | None = None):
    """The settings from the command line. `presets` ({name: fields a preset sets}): with --preset, the preset's values
    apply except for the flags given explicitly."""
    parsed = vars(build_parser(settings_class, description).parse_args(argv))
    preset = parsed.get("preset")
    if presets and preset:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])}
        settings = settings_class(preset=preset)
        for name, value in parsed.items():
            if name not in presets.get(preset, ()) or name in given:
                setattr(settings, name, value)
        return settings
    return settings_class(**parsed)


def flag(name: str) -> str:
    """The command-line flag of a settings field: 'micro_batch_size' -> '--micro-batch-size'."""
    return "--" + name.replace("_", "-")
