"""
``docs/options.md``, rendered from the option table of ``twistd signalling``.

The help texts of :class:`signalling.server.tap.Options` are the one source:
``twistd signalling --help`` prints them, and this module renders every
option (parameters, flags and ``opt_`` methods, with its default and the
range its coerce function checks) as Markdown. ``tests/test_docs.py``
checks that the committed ``docs/options.md`` is what it renders. After
changing an option, write the page again from the top of the checkout::

    python -m signalling.server.options_doc > docs/options.md
"""

import inspect
import re
import sys

from twisted.python import usage

from signalling.server.tap import Options

#: Where the page lives, from the top of the checkout.
PATH = "docs/options.md"
#: The command that writes it.
COMMAND = "python -m signalling.server.options_doc > docs/options.md"

_INTRO = f"""\
# Options of `twistd signalling`

<!-- Generated from the help texts in signalling/server/tap.py by
`{COMMAND}`;
tests/test_docs.py fails when it is out of date. Edit the help texts, not
this page. -->

Usage: `twistd [twistd options] signalling [options]`. The options of
`twistd` itself (`-n`, `--pidfile`, `--logfile`, `-u`/`-g`, ...) go before
`signalling`; those below after it. `twistd signalling --help` prints the
same help texts.
"""

_NOTES = """\
A number is checked against the range given with its option, and none may
be infinite or NaN. A bad option makes twistd print the usage and one error
line, and exit with status 1.
"""

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_<>\[\]])")
_OPTION_NAME = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*[a-z0-9]")


class Option:
    """
    One option of the table, as the page shows it.

    :ivar name: the long name, without ``--``.
    :ivar short: the one-letter synonym, or None.
    :ivar kind: ``"flag"`` (takes no value) or ``"parameter"``.
    :ivar default: the default shown, or None when the help text says it.
    :ivar help: the help text, whitespace collapsed.
    :ivar check: what the coerce function accepts (its ``coerceDoc``), or "".
    """

    def __init__(self, name, short, kind, default, help, check=""):
        self.name = name
        self.short = short
        self.kind = kind
        self.default = default
        self.help = " ".join((help or "").split())
        if self.help and not self.help.endswith((".", ")")):
            self.help += "."
        self.check = check


def options(options_class=Options):
    """
    :returns: every option of ``options_class`` (flags, parameters and
        ``opt_`` methods of its own, not ``--help``), sorted by name as
        ``--help`` sorts them.
    """
    found = {}
    for name, short, help in _rows(options_class, "optFlags", 3):
        found[name] = Option(name, short, "flag", None, help)
    for name, short, default, help, coerce in _rows(options_class, "optParameters", 5):
        check = getattr(coerce, "coerceDoc", "") if coerce is not None else ""
        found[name] = Option(name, short, "parameter", default, help, check)
    methods = {}
    for cls in reversed(options_class.__mro__):
        if cls in (usage.Options, dict, object):
            continue
        for attribute, value in vars(cls).items():
            if attribute.startswith("opt_") and callable(value):
                methods[attribute[len("opt_"):].replace("_", "-")] = value
    for method in set(methods.values()):
        names = sorted((n for n, m in methods.items() if m is method), key=len)
        takes_value = len(inspect.signature(method).parameters) > 1
        found[names[-1]] = Option(
            names[-1],
            names[0] if len(names[0]) == 1 else None,
            "parameter" if takes_value else "flag",
            None,
            method.__doc__,
        )
    return [found[name] for name in sorted(found)]


def _rows(options_class, attribute, width):
    """:returns: the rows of ``optFlags`` or ``optParameters``, padded to ``width``."""
    for row in getattr(options_class, attribute, []):
        yield list(row) + [None] * (width - len(row))


def _anchor(name):
    """:returns: the anchor GitHub gives the heading of option ``name``."""
    return "--" + name


def _text(text, known, own=None):
    """
    :returns: ``text`` as Markdown: option names as code, linked to their
        heading when ``known`` has them (but ``own``), everything else escaped.
    """
    out = []
    position = 0
    for match in _OPTION_NAME.finditer(text):
        out.append(_MARKDOWN_SPECIAL.sub(r"\\\1", text[position:match.start()]))
        name = match.group()[2:]
        code = f"`--{name}`"
        out.append(f"[{code}](#{_anchor(name)})" if name in known and name != own else code)
        position = match.end()
    out.append(_MARKDOWN_SPECIAL.sub(r"\\\1", text[position:]))
    return "".join(out)


def render(options_class=Options):
    """:returns: the Markdown page of every option of ``options_class``."""
    table = options(options_class)
    known = {option.name for option in table}
    longdesc = " ".join(getattr(options_class, "longdesc", "").split())
    parts = [_INTRO, _text(longdesc, known) + "\n", _NOTES]
    parts.append(
        "Options: "
        + " · ".join(f"[`--{o.name}`](#{_anchor(o.name)})" for o in table)
        + "\n"
    )
    for option in table:
        facts = ["Takes a value." if option.kind == "parameter" else "Takes no value."]
        if option.short:
            facts.append(f"Short: `-{option.short}`.")
        if option.check:
            facts.append(option.check)
        if option.default is not None:
            facts.append(f"Default: `{option.default}`.")
        parts.append(
            f"## `--{option.name}`\n\n{' '.join(facts)}\n\n{_text(option.help, known, option.name)}\n"
        )
    return "\n".join(parts)


def main():
    """Write the page to standard output."""
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
