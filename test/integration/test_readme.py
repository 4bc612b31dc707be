"""README.md's configuration table is the output of `ticketd config-table` (generated from the
one settings table in src/config.c); this fails when they differ."""
import difflib
import os
import unittest

from harness import SOURCE_DIR, run_ticketd

BEGIN = "<!-- config-table:begin -->"
END = "<!-- config-table:end -->"


def readme_table():
    with open(os.path.join(SOURCE_DIR, "README.md"), encoding="utf-8") as f:
        text = f.read()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise AssertionError(f"README.md must hold exactly one {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n").splitlines()


class ReadmeTest(unittest.TestCase):

    def test_config_table_matches_the_binary(self):
        r = run_ticketd(["config-table"], timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        generated = r.stdout.strip("\n").splitlines()
        self.assertGreater(len(generated), 2, "config-table printed no rows")
        documented = readme_table()
        diff = list(difflib.unified_diff(documented, generated, "README.md", "ticketd config-table",
                                         lineterm=""))
        self.assertEqual(diff, [], "README.md's configuration table is stale; paste the output of "
                         "`build/ticketd config-table` between the markers:\n" + "\n".join(diff))


if __name__ == "__main__":
    unittest.main()
