"""
The documentation against the code it describes, so that the two cannot
drift apart:

- ``docs/options.md`` is what :mod:`signalling.server.options_doc` renders
  from the option table (the help texts are the one source).
"""

import os
import re

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

