"""What a new user trips on (issue 20): options that are checked, usage errors that point to the
right help, and the smaller things a first walk through the commands finds."""
import json
import os
import unittest

from tests.util import ROOT, TempHome, tow

ONE = "def workflow(input, ctx):\n    return ctx.step('s', lambda: input)\n"


class ScheduleOptions(TempHome):
    """`schedule`'s actions take only their own options; each has its own --help."""

    def setUp(self):
        super().setUp()
        self.sc = self.sidecar()
        self.sc.deploy("my-workflow", ONE, runtime="python")
        self.sc.schedule_add("my-workflow", "*/5 * * * *")

    def test_options_an_action_does_not_take_are_refused_and_nothing_changes(self):
        for argv, wrong in ((["schedule", "rm", "my-workflow", "--tz", "Mars/Base", "-i", "{bad"],
                             "--tz Mars/Base -i {bad"),
                            (["schedule", "list", "--cron", "bogus"], "--cron bogus"),
                            (["schedule", "pause", "my-workflow", "--catch-up", "all"],
                             "--catch-up all"),
                            (["schedule", "resume", "my-workflow", "--name", "x"], "--name x")):
            with self.subTest(argv=argv):
                action = argv[1]
                err = self.assert_refused(argv, 2, "unrecognized arguments: " + wrong)
                self.assertIn("see `ty-openworkflow schedule %s --help`" % action, err)
        self.assertEqual([s["name"] for s in self.sc.schedules()], ["my-workflow"])

    def test_each_action_has_its_own_help(self):
        helps = {}
        for argv in (["schedule", "--help"], ["schedule", "add", "--help"],
                     ["schedule", "rm", "--help"], ["schedule", "list", "--help"]):
            code, out, err = self.cli(*argv)
            self.assertEqual(code, 0, err)
            helps[" ".join(argv)] = out
        self.assertEqual(len(set(helps.values())), 4)
        self.assertIn("--cron", helps["schedule add --help"])
        self.assertNotIn("--cron", helps["schedule rm --help"])
        self.assertNotIn("--tz", helps["schedule list --help"])

    def test_cron_help_and_readme_name_the_same_macros_as_the_parser(self):
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        help_text = " ".join(self.cli("schedule", "add", "--help")[1].split())
        for name in tow.CRON_MACRO_NAMES:
            with self.subTest(name=name):
                tow.Cron(name)  # the parser takes it
                self.assertIn("`%s`" % name, readme)
                self.assertIn(name, help_text)
        self.assertEqual(set(tow.CRON_MACRO_NAMES), set(tow._CRON_MACROS))

    def test_the_readme_forms_still_work(self):
        for argv in (["schedule", "add", "my-workflow", "--cron", "@yearly", "--name", "y",
                      "-i", '{"n": 1}', "--tz", "Europe/Paris", "--catch-up", "none", "--json"],
                     ["schedule", "list"], ["schedule", "list", "--json"],
                     ["schedule", "pause", "y"], ["schedule", "resume", "y", "--json"],
                     ["schedule", "rm", "y"]):
            with self.subTest(argv=argv):
                code, out, err = self.cli(*argv)
                self.assertEqual((code, err), (0, ""))
        self.assert_refused(["schedule", "add", "my-workflow"], 2, "needs --cron")
        self.assert_refused(["schedule", "rm"], 2, "required: NAME")


class UsageErrors(TempHome):
    """A usage error names the subcommand's own --help; an unknown command lists the public
    commands only."""

    def test_a_misspelt_option_points_to_the_subcommands_help(self):
        for argv, where in ((["start", "hello", "--inptu", "{}"], "start"),
                            (["start"], "start"),
                            (["list", "runs", "--bogus"], "list"),
                            (["plugin", "install", "--nope"], "plugin install")):
            with self.subTest(argv=argv):
                code, out, err = self.cli(*argv)
                self.assertEqual(code, 2)
                self.assertEqual(len(err.strip().splitlines()), 1, err)
                self.assertTrue(err.startswith("ty-openworkflow %s: " % where), err)
                self.assertIn("see `ty-openworkflow %s --help`" % where, err)

    def test_an_unknown_command_lists_only_the_public_ones(self):
        code, out, err = self.cli("bogus")
        self.assertEqual(code, 2)
        self.assertIn("unknown command 'bogus'", err)
        self.assertIn("schedule", err)
        for internal in ("runner", "dist"):
            self.assertNotIn(internal, err)
        self.assertIn("did you mean status?", self.cli("statsu")[2])


if __name__ == "__main__":
    unittest.main()
