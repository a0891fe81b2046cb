"""The YAML-subset reader, config defaults and validation, and the pure helpers."""
import os
import textwrap
import unittest

from tests.util import ROOT, TempHome, tow

# What `init` writes with the default data dir: the module's own template, filled in.
SEED_CONFIG = tow.DEFAULT_CONFIG_TEXT.format(data_dir="~/.config/ty-openworkflow",
                                             exec_dir="~/.config/ty-openworkflow/exec",
                                             docker_dir="~/.config/ty-openworkflow/docker")


class YamlSubset(unittest.TestCase):
    def test_scalars(self):
        cases = [
            ("a: 1", 1), ("a: -3", -3), ("a: 1.5", 1.5), ("a: true", True), ("a: false", False),
            ("a: ~", None), ("a: null", None), ("a:", None), ('a: ""', ""), ("a: ''", ""),
            ('a: "x # not a comment"', "x # not a comment"), ("a: x # a comment", "x"),
            ("a: 'it''s'", "it's"), ('a: "tab\\there"', "tab\there"), ("a: /webhook", "/webhook"),
            ("a: 30s", "30s"), ("a: ~/x", "~/x"), ("a: {}", {}), ("a: http://h:1/p", "http://h:1/p"),
            ("a: op read 'x'", "op read 'x'"),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(tow.parse_yaml(text)[0], {"a": expected})

    def test_nesting_and_line_numbers(self):
        data, lines = tow.parse_yaml("# top\na:\n  b:\n    c: 1\n\n  d: x\ne: 2\n")
        self.assertEqual(data, {"a": {"b": {"c": 1}, "d": "x"}, "e": 2})
        self.assertEqual(lines, {"a": 2, "a.b": 3, "a.b.c": 4, "a.d": 6, "e": 7})

    def test_errors_name_file_and_line(self):
        cases = [
            ("a: 1\n  b: 2\n", "f.yaml:2: unexpected indentation"),
            ("a: 1\na: 2\n", "f.yaml:2: duplicate key 'a'"),
            ("a:\n\tb: 1\n", "f.yaml:2: tab used for indentation"),
            ('a: "open\n', "f.yaml:1: unterminated double-quoted string"),
            ("just words\n", "f.yaml:1: expected 'key: value'"),
            ("a:\n  - x\n", "f.yaml:2: lists are not used"),
            ("a: [1, 2]\n", "f.yaml:1: '[1, 2]' is YAML this reader does not support"),
            ("  a: 1\n", "f.yaml:1: the first key must not be indented"),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                with self.assertRaises(tow.ConfigError) as cm:
                    tow.parse_yaml(text, "f.yaml")
                self.assertIn(expected, str(cm.exception))

    def test_durations(self):
        for value, ms in [("30s", 30000), ("5m", 300000), ("1h30m", 5400000), ("500ms", 500), ("2d", 172800000),
                          (5, 5000), ("1.5s", 1500), ("0", 0)]:
            with self.subTest(value=value):
                self.assertEqual(tow.parse_duration(value), ms)
        for bad in ("", "soon", "5 minutes", "-1s", "1x", True, -1):
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError):
                    tow.parse_duration(bad)

    def test_backoff(self):
        policy = dict(tow.DEFAULT_RETRY)
        self.assertEqual([tow.backoff_ms(policy, n) for n in range(1, 10)],
                         [1000, 2000, 4000, 8000, 16000, 32000, 64000, 100000, 100000])


class ConfigFile(TempHome):
    def test_seed_config_parses_with_every_key(self):
        cfg = tow.load_config(text=SEED_CONFIG, path=os.path.join(self.tmp, "c.yaml"))
        self.assertEqual(cfg.data_dir, os.path.join(self.home, ".config/ty-openworkflow"))
        self.assertEqual(cfg["adapters.exec.work_dir"], os.path.join(self.home, ".config/ty-openworkflow/exec"))
        self.assertEqual(cfg["adapters.cloudflare.api_token_cmd"], "op read 'op://Private/Cloudflare/api_token'")
        self.assertEqual(cfg["webhook.port"], 8765)
        self.assertEqual(cfg["poll_interval"], 30000)
        self.assertIs(cfg["taskyou.auto_create_tasks"], True)
        self.assertEqual(cfg["default_adapter"], "exec")

    def test_init_writes_the_seed_defaults_and_never_overwrites(self):
        path = os.path.join(self.tmp, "fresh", "config.yaml")
        code, out, err = self.cli("--config", path, "init")
        self.assertEqual(code, 0, err)
        with open(path) as f:
            self.assertEqual(f.read(), SEED_CONFIG)
        self.assertTrue(os.path.isdir(os.path.join(self.home, ".config/ty-openworkflow")))
        with open(path, "a") as f:
            f.write("# mine\n")
        code, out, err = self.cli("--config", path, "init")
        self.assertEqual(code, 1)
        self.assertIn("already exists", err)
        self.assertIn("--force", err)
        with open(path) as f:
            self.assertTrue(f.read().endswith("# mine\n"))
        code, out, err = self.cli("--config", path, "init", "--force")
        self.assertEqual(code, 0, err)
        with open(path) as f:
            self.assertEqual(f.read(), SEED_CONFIG)

    def test_init_with_a_data_dir(self):
        path = os.path.join(self.tmp, "c2.yaml")
        code, out, err = self.cli("--config", path, "init", "--data-dir", os.path.join(self.tmp, "dd"))
        self.assertEqual(code, 0, err)
        cfg = tow.load_config(path)
        self.assertEqual(cfg.data_dir, os.path.join(self.tmp, "dd"))
        self.assertEqual(cfg["adapters.exec.work_dir"], os.path.join(self.tmp, "dd", "exec"))

    def test_bad_values_say_where(self):
        cases = [
            ("webhook:\n  port: eighty\n", ":2: webhook.port: expected a whole number"),
            ("poll_interval: soon\n", ":1: poll_interval: invalid duration"),
            ("adapters:\n  exec:\n    enabled: maybe\n", ":3: adapters.exec.enabled: expected true or false"),
            ("taskyou:\n  clii: ty\n", ":2: unknown key 'taskyou.clii'; known here: auto_create_tasks, cli"),
            ("default_adapter: lambda\n", ":1: default_adapter 'lambda' is not one of exec, docker, cloudflare"),
            ("webhook: 3\n", ":1: webhook must be a mapping"),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                with open(self.config_path, "w") as f:
                    f.write(text)
                code, out, err = self.cli("list", "runs")
                self.assertEqual(code, 1)
                self.assertIn(self.config_path + expected, err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_missing_config_file_means_defaults(self):
        cfg = tow.load_config(os.path.join(self.tmp, "absent.yaml"))
        self.assertFalse(cfg.exists)
        self.assertEqual(cfg.data_dir, os.path.join(self.home, ".config/ty-openworkflow"))

    def test_environment_overrides_the_data_dir(self):
        os.environ[tow.DATA_DIR_ENV] = os.path.join(self.tmp, "elsewhere")
        self.assertEqual(tow.load_config(self.config_path).data_dir, os.path.join(self.tmp, "elsewhere"))


class ReadmeExample(unittest.TestCase):
    def test_readme_config_block_is_valid(self):
        with open(os.path.join(ROOT, "README.md")) as f:
            text = f.read()
        blocks = [textwrap.dedent(b.split("```", 1)[0].rstrip(" ")) for b in text.split("```yaml\n")[1:]]
        self.assertTrue(blocks)
        for block in blocks:
            with self.subTest(block=block[:40]):
                tow.load_config(text=block, path="/tmp/readme.yaml")


if __name__ == "__main__":
    unittest.main()
