"""
The documentation against the code it describes, so that the two cannot
drift apart:

- ``docs/options.md`` is what :mod:`signalling.server.options_doc` renders
  from the option table (the help texts are the one source);
- the README's layout names every module of ``signalling/`` and
  ``twisted/plugins/``, one line each, and nothing that does not exist;
- the layers of ``docs/architecture.md`` hold: each module's imports, read
  from its source (``ast``), obey its layer's rule.
"""

import ast
import os
import re
import sys

from twisted.trial import unittest

from signalling.server import options_doc, tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


class OptionsPageTests(unittest.TestCase):
    """docs/options.md, generated from the option table of tap.py."""

    def test_the_committed_page_is_what_the_option_table_renders(self):
        """
        docs/options.md equals the generator's output: a changed help text,
        default or option without the page written again fails here.
        """
        committed = read(options_doc.PATH)
        rendered = options_doc.render()
        if committed != rendered:
            self.fail(
                f"{options_doc.PATH} is out of date with signalling/server/tap.py; "
                f"from the top of the checkout run:\n    {options_doc.COMMAND}"
            )

    def test_the_page_has_every_option_that_twistd_accepts(self):
        """
        Every long option Twisted derives from Options (flags, parameters,
        opt_ methods) has its heading on the page, and no other heading is
        there; --help is Twisted's own.
        """
        accepted = {name.rstrip("=") for name in tap.Options().longOpt} - {"help"}
        rendered = options_doc.render()
        headings = set(re.findall(r"^## `--([a-z0-9-]+)`$", rendered, re.M))
        self.assertEqual(headings, accepted)

    def test_a_short_synonym_and_a_coerce_range_are_shown(self):
        """-p is shown for --port; a coerced option shows its range and default."""
        page = options_doc.render()
        port = page.split("## `--port`")[1].split("\n## ")[0]
        self.assertIn("Short: `-p`.", port)
        backlog = page.split("## `--backlog`")[1].split("\n## ")[0]
        self.assertIn("Must be a whole number, 1 or more. Default: `4096`.", backlog)

    def test_help_text_is_escaped_and_options_are_linked(self):
        """Markdown in a help text cannot break the page; option names link to their heading."""
        page = options_doc.render()
        self.assertIn(r"ERROR room '\<id\>' is full", page)
        self.assertIn("[`--dialect-wait`](#--dialect-wait)", page)


# --- the README's layout ---------------------------------------------------

#: The heading of the README section whose first code block is the layout.
LAYOUT_HEADING = "## Layout"
#: Where the modules live that the layout must list, one line each.
LAYOUT_ROOTS = ("signalling", os.path.join("twisted", "plugins"))


def layout_block(readme):
    """
    :returns: the lines of the first code block after :data:`LAYOUT_HEADING`.
    """
    start = readme.index("\n" + LAYOUT_HEADING + "\n")
    match = re.compile(r"^```\n(.*?)^```$", re.S | re.M).search(readme, start)
    return match.group(1).splitlines()


def layout_paths(lines):
    """
    :returns: the paths the layout block names, in order: a line that starts
        in column 0 names a path from the top of the checkout; an indented
        one a path inside the last folder (a name ending in ``/``) named
        in column 0. The name is the line's first word.
    """
    paths = []
    folder = ""
    for line in lines:
        if not line.strip():
            continue
        name = line.split()[0]
        if line[0].isspace():
            paths.append(folder + name)
        else:
            paths.append(name)
            if name.endswith("/"):
                folder = name
    return paths


def expected_layout():
    """
    :returns: ``(folders, modules)`` that the layout must name: every package
        under :data:`LAYOUT_ROOTS` as its folder (``signalling/core/``,
        standing for its ``__init__.py``) and every other module as its
        path, plus the plugin folder.
    """
    folders, modules = set(), set()
    for top in LAYOUT_ROOTS:
        for directory, subdirs, files in os.walk(os.path.join(ROOT, top)):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            relative = os.path.relpath(directory, ROOT).replace(os.sep, "/") + "/"
            for name in files:
                if not name.endswith(".py"):
                    continue
                if name == "__init__.py":
                    folders.add(relative)
                else:
                    modules.add(relative + name)
    return folders, modules


def layout_fix(missing, extra):
    """:returns: the lines to add and remove, as a message for the README's editor."""
    advice = [f"README.md's layout ({LAYOUT_HEADING}) does not match the tree."]
    for path in sorted(missing):
        if path.endswith("/"):
            advice.append(
                f"add, in column 0:  {path}    <what the package holds>"
                "  (its modules go indented under it)"
            )
        else:
            folder, name = path.rsplit("/", 1)
            advice.append(
                f"add, under the line {folder}/:  '  {name}    <what it holds>'"
                f"  (or in column 0: {path})"
            )
    for path in sorted(extra):
        advice.append(f"remove the line naming {path} (it does not exist)")
    return "\n".join(advice)


class LayoutTests(unittest.TestCase):
    """The README's layout block, against the files in the tree."""

    def test_the_parser_reads_folders_and_modules_under_them(self):
        """A column-0 folder line sets the folder of the indented lines under it."""
        lines = [
            "signalling/core/        the core",
            "  words.py              words",
            "",
            "twisted/plugins/x.py    the plugin",
            "tests/                  the suite",
            "  helpers.py            helpers",
        ]
        self.assertEqual(
            layout_paths(lines),
            ["signalling/core/", "signalling/core/words.py", "twisted/plugins/x.py",
             "tests/", "tests/helpers.py"],
        )

    def test_every_module_has_its_line_and_every_line_exists(self):
        """
        Each module under signalling/ and twisted/plugins/ (a package by its
        folder) has a line of its own in the layout, and every path the
        layout names (modules, folders, files) exists.
        """
        paths = layout_paths(layout_block(read("README.md")))
        folders, modules = expected_layout()
        named = set(paths)
        missing = (folders | modules) - named
        extra = {p for p in named if not os.path.exists(os.path.join(ROOT, p))}
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if missing or extra:
            self.fail(layout_fix(missing, extra))
        self.assertEqual(twice, [], "README.md's layout names these more than once")


# --- the layers ------------------------------------------------------------

#: Stands in the rules for any module of the standard library.
STDLIB = "<the standard library>"


class Rule:
    """
    What the modules of one layer may import.

    :ivar layer: the dotted prefix of the modules the rule applies to.
    :ivar rule: the rule in words, as docs/architecture.md states it.
    :ivar only: if not None, every import must be one of these (a dotted
        prefix, or :data:`STDLIB`).
    :ivar never: no import may be one of these dotted prefixes.
    :ivar exceptions: ``{module: prefixes}`` a named module may import
        despite ``never``.
    """

    def __init__(self, layer, rule, only=None, never=(), exceptions=None):
        self.layer = layer
        self.rule = rule
        self.only = only
        self.never = never
        self.exceptions = exceptions or {}

    def applies_to(self, module):
        return within(module, self.layer)

    def breaks(self, module, target):
        """:returns: whether ``module`` importing ``target`` breaks the rule."""
        allowed = self.exceptions.get(module, ())
        if any(within(target, prefix) for prefix in allowed):
            return False
        if any(within(target, prefix) for prefix in self.never):
            return True
        if self.only is None:
            return False
        return not any(
            is_stdlib(target) if prefix == STDLIB else within(target, prefix)
            for prefix in self.only
        )


def within(name, prefix):
    """:returns: whether dotted ``name`` is ``prefix`` or inside it."""
    return name == prefix or name.startswith(prefix + ".")


def is_stdlib(name):
    return name.split(".")[0] in sys.stdlib_module_names


#: The layers of docs/architecture.md, each with its rule. A module may
#: fall under several (core.words under the core's and its own).
RULES = [
    Rule(
        "signalling.core",
        "core imports no other layer, no Autobahn and not Twisted's reactor: "
        "of Twisted only Deferreds, the logger and Failure (and zope.interface)",
        only=[
            "signalling.core", STDLIB, "zope.interface",
            "twisted.internet.defer", "twisted.logger", "twisted.python.failure",
        ],
    ),
    Rule(
        "signalling.core.words",
        "core/words.py imports the standard library only "
        "(contrib/gst_peer.py reads it under the system Python)",
        only=[STDLIB],
    ),
    Rule(
        "signalling.cluster",
        "cluster imports core only, never server or tools, and no Autobahn",
        never=["signalling.server", "signalling.tools", "autobahn"],
    ),
    Rule(
        "signalling.server",
        "server imports no tool",
        never=["signalling.tools"],
    ),
    Rule(
        "signalling.tools",
        "tools import core (and each other), never cluster or server; "
        "signalling-token alone reads server/auth.py, the token format the server checks",
        never=["signalling.cluster", "signalling.server"],
        exceptions={"signalling.tools.token": ["signalling.server.auth"]},
    ),
    Rule(
        "signalling.tools.bench",
        "the load generator runs on asyncio: no Twisted, no Autobahn",
        never=["twisted", "autobahn", "txaio", "zope"],
    ),
    Rule(
        "twisted.plugins.signalling_plugin",
        "the plugin names the server by a string and imports only ServiceMaker",
        only=["twisted.application.service"],
    ),
]


def project_modules():
    """:returns: ``{dotted name: path}`` of every module under signalling/ and twisted/plugins/."""
    found = {}
    for top in LAYOUT_ROOTS:
        for directory, subdirs, files in os.walk(os.path.join(ROOT, top)):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    dotted = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def imports_of(source, module, is_package=False):
    """
    :returns: ``[(line, target)]``: every module ``source`` imports, anywhere
        in it (functions included), as an absolute dotted name;
        ``from a import b`` gives ``a.b`` (``b`` may be a module).
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.extend(
                (node.lineno, base if alias.name == "*" else f"{base}.{alias.name}")
                for alias in node.names
            )
    return sorted(found)


def broken_rules(modules, rules=RULES):
    """:returns: one line per import that breaks a rule, naming module, line and rule."""
    broken = []
    for module, path in sorted(modules.items()):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        is_package = path.endswith("__init__.py")
        for line, target in imports_of(source, module, is_package):
            for rule in rules:
                if rule.applies_to(module) and rule.breaks(module, target):
                    relative = os.path.relpath(path, ROOT)
                    broken.append(f"{relative}:{line} imports {target}: {rule.rule}")
    return broken


class LayerTests(unittest.TestCase):
    """The import rules of docs/architecture.md, read from the sources."""

    def test_every_module_obeys_its_layers_rules(self):
        """No module under signalling/ or twisted/plugins/ imports what its layer forbids."""
        broken = broken_rules(project_modules())
        self.assertEqual(broken, [], "\n" + "\n".join(broken))

    def test_every_module_belongs_to_a_layer(self):
        """A new module or package lands in core, cluster, server or tools (or is the plugin)."""
        homeless = [
            module for module in project_modules()
            if module != "signalling" and not any(rule.applies_to(module) for rule in RULES)
        ]
        self.assertEqual(homeless, [])

    def test_the_rules_are_the_ones_the_architecture_page_states(self):
        """docs/architecture.md states each rule in the words the test reports."""
        page = " ".join(read("docs/architecture.md").split())
        missing = [rule.rule for rule in RULES if rule.rule not in page]
        self.assertEqual(missing, [], "docs/architecture.md does not state these rules")

    def test_a_reactor_in_the_core_is_caught(self):
        """
        The check sees imports anywhere in a module, relative ones resolved:
        the core reaching for the reactor or Autobahn, the server for a tool.
        """
        source = (
            "from twisted.internet import defer\n"
            "def later():\n"
            "    from twisted.internet import reactor\n"
            "from ..server import websocket\n"
            "import autobahn.twisted\n"
        )
        core = [Rule("signalling.core", "core", only=RULES[0].only)]
        targets = imports_of(source, "signalling.core.x")
        self.assertEqual(
            [t for _, t in targets],
            ["twisted.internet.defer", "twisted.internet.reactor",
             "signalling.server.websocket", "autobahn.twisted"],
        )
        self.assertEqual(
            [t for _, t in targets if core[0].breaks("signalling.core.x", t)],
            ["twisted.internet.reactor", "signalling.server.websocket", "autobahn.twisted"],
        )
        server = RULES[3]
        self.assertTrue(server.breaks("signalling.server.x", "signalling.tools.client"))
        self.assertFalse(server.breaks("signalling.server.x", "signalling.cluster.redis"))
