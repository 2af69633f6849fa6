"""
Loading the per-model profiles, TabbyAPI's key file, and the TabbyAPI checkout, all over
temporary directories.
"""

from __future__ import annotations

import copy
import json
import stat
import sys
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.config import (
    Catalog,
    ConfigError,
    Keys,
    Profile,
    TabbyInstall,
    readKeys,
)
from tabbyproxy.keepalive import FOREVER

QWEN = """\
model:
  model_name: Qwen3-8B-exl3-4.0bpw
  max_seq_len: 32768
  unload_timer: 15m
draft_model:
  draft_model_name: Qwen3-0.6B
sampling:
  override_preset: safe_defaults
template:
  system_time: true
  system: "You are a helpful assistant."
  temperature: 0.6
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class CatalogLoadTests(SynchronousTestCase):
    """
    L{Catalog.load} over a directory of profiles.
    """

    def setUp(self) -> None:
        self.configDir = Path(self.mktemp())
        self.configDir.mkdir()

    def test_idsFromNestedPaths(self) -> None:
        """
        A profile's id is its path under the config directory without C{.yml}, C{/}-separated,
        however deep.
        """
        write(self.configDir / "qwen.yml", QWEN)
        write(self.configDir / "coding" / "x.yml", "model: {model_name: X}\n")
        write(self.configDir / "a" / "b" / "c.yml", "model: {model_name: C}\n")
        catalog = Catalog.load(self.configDir)
        self.assertEqual(sorted(catalog.profiles), ["a/b/c", "coding/x", "qwen"])
        self.assertEqual(catalog.profiles["coding/x"].id, "coding/x")
        self.assertEqual(catalog.profiles["coding/x"].modelName, "X")
        self.assertEqual(catalog.profiles["coding/x"].path, self.configDir / "coding" / "x.yml")
        self.assertEqual(sorted(profile.id for profile in catalog), ["a/b/c", "coding/x", "qwen"])

    def test_onlyYmlFiles(self) -> None:
        """
        Only C{*.yml} files are profiles: C{.yaml}, other extensions and hidden files are ignored.
        """
        write(self.configDir / "one.yml", "model: {model_name: One}\n")
        write(self.configDir / "two.yaml", "model: {model_name: Two}\n")
        write(self.configDir / "README.md", "# not a profile\n")
        write(self.configDir / "three.yml.bak", "model: {model_name: Three}\n")
        write(self.configDir / ".hidden.yml", "model: {model_name: Hidden}\n")
        catalog = Catalog.load(self.configDir)
        self.assertEqual(list(catalog.profiles), ["one"])

    def test_emptyDirectory(self) -> None:
        """
        An empty directory is a catalog with no profiles, not an error.
        """
        self.assertEqual(dict(Catalog.load(self.configDir).profiles), {})

    def test_templateSplitFromTabbySections(self) -> None:
        """
        The C{template} section goes to C{Profile.template} and never into C{Profile.tabby};
        every other section is kept for TabbyAPI as written.
        """
        write(self.configDir / "qwen.yml", QWEN)
        profile = Catalog.load(self.configDir).profiles["qwen"]
        self.assertEqual(
            dict(profile.template),
            {"system_time": True, "system": "You are a helpful assistant.", "temperature": 0.6},
        )
        self.assertEqual(sorted(profile.tabby), ["draft_model", "model", "sampling"])
        self.assertEqual(profile.tabby["sampling"], {"override_preset": "safe_defaults"})
        self.assertEqual(profile.tabby["draft_model"], {"draft_model_name": "Qwen3-0.6B"})

    def test_unloadTimerRemovedAndParsed(self) -> None:
        """
        C{model.unload_timer} is the proxy's: it is parsed into C{unloadTimer} (C{"15m"} is 900
        seconds) and removed from the model section handed to TabbyAPI.
        """
        write(self.configDir / "qwen.yml", QWEN)
        profile = Catalog.load(self.configDir).profiles["qwen"]
        self.assertEqual(profile.unloadTimer, 900.0)
        self.assertEqual(
            dict(profile.modelSection),
            {"model_name": "Qwen3-8B-exl3-4.0bpw", "max_seq_len": 32768},
        )
        self.assertNotIn("unload_timer", profile.tabby["model"])

    def test_unloadTimerForms(self) -> None:
        """
        The profile's C{unload_timer} takes the forms C{keep_alive} does: seconds, a duration,
        a negative value for forever; without one, C{unloadTimer} is C{None}.
        """
        write(self.configDir / "seconds.yml", "model: {model_name: A, unload_timer: 60}\n")
        write(self.configDir / "forever.yml", "model: {model_name: A, unload_timer: -1}\n")
        write(self.configDir / "zero.yml", "model: {model_name: A, unload_timer: 0}\n")
        write(self.configDir / "none.yml", "model: {model_name: A}\n")
        profiles = Catalog.load(self.configDir).profiles
        self.assertEqual(profiles["seconds"].unloadTimer, 60.0)
        self.assertEqual(profiles["forever"].unloadTimer, FOREVER)
        self.assertEqual(profiles["zero"].unloadTimer, 0.0)
        self.assertIsNone(profiles["none"].unloadTimer)

    def test_noTemplate(self) -> None:
        """
        A profile without a C{template} section has an empty template.
        """
        write(self.configDir / "plain.yml", "model: {model_name: A}\n")
        self.assertEqual(dict(Catalog.load(self.configDir).profiles["plain"].template), {})

    def assertConfigError(self, path: Path, *fragments: str) -> ConfigError:
        """
        Loading the catalog fails with a L{ConfigError} naming C{path} and containing each of
        C{fragments}.
        """
        error = self.assertRaises(ConfigError, Catalog.load, self.configDir)
        message = str(error)
        self.assertIn(str(path), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return error

    def test_invalidYAML(self) -> None:
        """
        A file that is not YAML is an error naming the file.
        """
        path = write(self.configDir / "broken.yml", "model: [unclosed\n")
        self.assertConfigError(path, "not valid YAML")

    def test_notAMapping(self) -> None:
        """
        A YAML document that is not a mapping (a list, a scalar, an empty file) is an error.
        """
        for text, kind in [("- a\n- b\n", "list"), ("just text\n", "str"), ("", "nothing")]:
            path = write(self.configDir / "odd.yml", text)
            self.assertConfigError(path, "expected a mapping", kind)

    def test_missingModelName(self) -> None:
        """
        A profile must name the model folder in C{model.model_name}.
        """
        for text in ["sampling: {x: 1}\n", "model: {max_seq_len: 4096}\n", "model: Qwen\n",
                     "model: {model_name: ''}\n"]:
            path = write(self.configDir / "nameless.yml", text)
            self.assertConfigError(path, "model.model_name")

    def test_templateNotAMapping(self) -> None:
        """
        A C{template} that is not a mapping is an error.
        """
        path = write(self.configDir / "t.yml", "model: {model_name: A}\ntemplate: [1, 2]\n")
        self.assertConfigError(path, "template must be a mapping", "list")
        path = write(self.configDir / "t.yml", "model: {model_name: A}\ntemplate: be nice\n")
        self.assertConfigError(path, "template must be a mapping", "str")

    def test_badUnloadTimer(self) -> None:
        """
        An C{unload_timer} that is not a duration is an error naming the file and the key.
        """
        path = write(self.configDir / "t.yml", "model: {model_name: A, unload_timer: 5 minutes}\n")
        self.assertConfigError(path, "model.unload_timer", "5 minutes")
        path = write(self.configDir / "t.yml", "model: {model_name: A, unload_timer: true}\n")
        self.assertConfigError(path, "model.unload_timer")

    def test_symlinkEscapingConfigDir(self) -> None:
        """
        A profile that is a symbolic link to a file outside the config directory is refused.
        """
        outside = write(Path(self.mktemp()) / "secret.yml", "model: {model_name: A}\n")
        link = self.configDir / "escape.yml"
        link.symlink_to(outside.absolute())
        self.assertConfigError(link, "outside the config directory")

    def test_symlinkedDirectoryEscapingConfigDir(self) -> None:
        """
        A symbolically linked directory that leads outside the config directory is refused too.
        """
        outside = Path(self.mktemp())
        write(outside / "x.yml", "model: {model_name: A}\n")
        (self.configDir / "linked").symlink_to(outside.absolute(), target_is_directory=True)
        self.assertConfigError(self.configDir / "linked" / "x.yml", "outside the config directory")

    def test_symlinkInsideConfigDir(self) -> None:
        """
        A symbolic link to another profile inside the config directory is allowed (an alias).
        """
        write(self.configDir / "real.yml", "model: {model_name: A}\n")
        (self.configDir / "alias.yml").symlink_to("real.yml")
        catalog = Catalog.load(self.configDir)
        self.assertEqual(sorted(catalog.profiles), ["alias", "real"])
        self.assertEqual(catalog.profiles["alias"].modelName, "A")

    def test_missingDirectory(self) -> None:
        """
        A config directory that does not exist is an error naming it.
        """
        missing = Path(self.mktemp())
        error = self.assertRaises(ConfigError, Catalog.load, missing)
        self.assertIn(str(missing), str(error))
        self.assertIn("does not exist", str(error))

    def test_unreadableFile(self) -> None:
        """
        A profile path that cannot be read (here: a dangling symbolic link) is an error naming
        the file, not an L{OSError}.
        """
        link = self.configDir / "dangling.yml"
        link.symlink_to(self.configDir / "nowhere.yml")
        self.assertConfigError(link)


class CatalogResolveTests(SynchronousTestCase):
    """
    L{Catalog.resolve} turns a client's model name into a profile.
    """

    def setUp(self) -> None:
        configDir = Path(self.mktemp())
        write(configDir / "qwen.yml", "model: {model_name: Q}\n")
        write(configDir / "coding" / "x.yml", "model: {model_name: X}\n")
        self.catalog = Catalog.load(configDir)

    def test_byId(self) -> None:
        """
        A profile id resolves to that profile, nested ids included.
        """
        resolved = self.catalog.resolve("coding/x")
        assert resolved is not None
        self.assertEqual(resolved.id, "coding/x")
        self.assertIs(self.catalog.resolve("qwen"), self.catalog.profiles["qwen"])

    def test_latestTag(self) -> None:
        """
        Ollama clients add C{:latest}; it resolves to the untagged profile.
        """
        self.assertIs(self.catalog.resolve("qwen:latest"), self.catalog.profiles["qwen"])
        self.assertIs(self.catalog.resolve("coding/x:latest"), self.catalog.profiles["coding/x"])

    def test_ollamaNames(self) -> None:
        """
        Names as Ollama matches them: any case (the tag too), surrounding spaces, and Ollama's
        default namespace C{library/} and host C{registry.ollama.ai/library/}, with or without
        a tag (issue 11, item 10).
        """
        qwen = self.catalog.profiles["qwen"]
        for name in ("QWEN", "Qwen:Latest", " qwen ", "\tqwen:latest\n", "library/qwen",
                     "Library/Qwen:latest", "registry.ollama.ai/library/qwen:latest",
                     "REGISTRY.OLLAMA.AI/library/qwen"):
            self.assertIs(self.catalog.resolve(name), qwen, name)
        self.assertIs(self.catalog.resolve("Coding/X:LATEST"), self.catalog.profiles["coding/x"])
        for name in ("library/", "registry.ollama.ai/qwen/x", "library/../qwen", "other/qwen", " "):
            self.assertIsNone(self.catalog.resolve(name), name)

    def test_exactNameFirst(self) -> None:
        """
        A profile whose id differs from another only in case, or is itself under C{library/},
        is found by its exact name.
        """
        configDir = Path(self.mktemp())
        for profileId in ("qwen", "Qwen", "library/qwen"):
            write(configDir / f"{profileId}.yml", "model: {model_name: Q}\n")
        catalog = Catalog.load(configDir)
        for profileId in ("qwen", "Qwen", "library/qwen"):
            resolved = catalog.resolve(profileId)
            assert resolved is not None
            self.assertEqual(resolved.id, profileId)

    def test_otherTagUnknown(self) -> None:
        """
        Tags other than C{:latest} are not stripped.
        """
        self.assertIsNone(self.catalog.resolve("qwen:7b"))

    def test_unknown(self) -> None:
        """
        An unknown name (or the model folder's name, which is not an id) resolves to C{None}.
        """
        self.assertIsNone(self.catalog.resolve("llama"))
        self.assertIsNone(self.catalog.resolve("Q"))
        self.assertIsNone(self.catalog.resolve(""))
        self.assertIsNone(self.catalog.resolve(":latest"))
        self.assertIsNone(self.catalog.resolve("../qwen"))

    def test_nonString(self) -> None:
        """
        Anything but a string resolves to C{None} rather than raising.
        """
        for name in [None, 1, ["qwen"], {"qwen": 1}, b"qwen"]:
            self.assertIsNone(self.catalog.resolve(name))


class AliasTests(SynchronousTestCase):
    """
    A profile's C{aliases} are other names that resolve to it, and never reach TabbyAPI.
    """

    def load(self, files: dict[str, str]) -> Catalog:
        configDir = Path(self.mktemp())
        for name, text in files.items():
            write(configDir / name, text)
        return Catalog.load(configDir)

    def test_aliasesResolve(self) -> None:
        """
        An alias resolves to its profile, with C{:latest} too; the section is the proxy's own.
        """
        catalog = self.load({"qwen.yml": "model: {model_name: Q}\naliases: [claude-sonnet-4-5, gpt-5-codex]\n"})
        qwen = catalog.profiles["qwen"]
        for name in ("claude-sonnet-4-5", "gpt-5-codex", "gpt-5-codex:latest"):
            self.assertIs(catalog.resolve(name), qwen)
        self.assertEqual(qwen.aliases, ("claude-sonnet-4-5", "gpt-5-codex"))
        self.assertNotIn("aliases", qwen.tabby)
        self.assertIsNone(catalog.resolve("claude-opus-4-5"))

    def test_conflicts(self) -> None:
        """
        An alias that is another profile's id, or that an earlier profile claimed, is a
        configuration error that names both; a reload keeps serving and reports it.
        """
        for files in ({"a.yml": "model: {model_name: A}\naliases: [b]\n", "b.yml": "model: {model_name: B}\n"},
                      {"a.yml": "model: {model_name: A}\naliases: [gpt]\n",
                       "b.yml": "model: {model_name: B}\naliases: [gpt]\n"}):
            with self.assertRaises(ConfigError) as raised:
                self.load(files)
            self.assertIn("already names the profile", str(raised.exception))
        configDir = Path(self.mktemp())
        write(configDir / "a.yml", "model: {model_name: A}\naliases: [gpt]\n")
        catalog = Catalog.load(configDir)
        write(configDir / "b.yml", "model: {model_name: B}\naliases: [gpt]\n")
        reloaded, problems = catalog.reloaded(configDir)
        self.assertEqual(reloaded.resolve("gpt"), reloaded.profiles["a"])
        self.assertEqual(len(problems), 1)

    def test_badAliases(self) -> None:
        """
        Aliases must be a list of non-empty names.
        """
        for value in ("gpt", "[1]", '[""]'):
            with self.assertRaises(ConfigError):
                self.load({"a.yml": f"model: {{model_name: A}}\naliases: {value}\n"})


class AliasOnEveryAPITests(SynchronousTestCase):
    def test_everyAPI(self) -> None:
        """
        An alias starts its profile's model on every API (OpenAI chat, Ollama, Responses,
        Messages); an unknown name is a 404 in each API's own error shape.
        """
        from treq import content

        from tests.support.fakes import InMemoryProxy

        proxy = InMemoryProxy(Path(self.mktemp()), {"qwen": {"model": {"model_name": "Q"}, "aliases": ["claude-x"]}})
        chat = {"messages": [{"role": "user", "content": "Hi"}]}
        routes: list[tuple[str, dict[str, Any], Any]] = [
            ("/v1/chat/completions", chat, lambda error: error["error"]["code"] == "model_not_found"),
            ("/api/chat", {**chat, "stream": False}, lambda error: isinstance(error["error"], str)),
            ("/v1/responses", {"input": "Hi"}, lambda error: error["error"]["code"] == "model_not_found"),
            ("/v1/messages", {**chat, "max_tokens": 5}, lambda error: error["error"]["type"] == "not_found_error"),
        ]
        for path, body, isItsShape in routes:
            for name, status in (("claude-x", 200), ("claude-y", 404)):
                proxy.tabby.chunks = [b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}'
                                      b'\r\n\r\n', b"data: [DONE]\r\n\r\n"]
                d = proxy.client.post(f"http://localhost{path}", json={**body, "model": name})
                proxy.flush()
                response = self.successResultOf(d)
                raw = self.successResultOf(content(response))
                self.assertEqual(response.code, status, (path, raw))
                if status == 404:
                    self.assertTrue(isItsShape(json.loads(raw)), (path, raw))
        self.assertEqual(len(proxy.reactor.spawned), 1)


class ReadKeysTests(SynchronousTestCase):
    """
    L{readKeys} reads TabbyAPI's C{api_tokens.yml}.
    """

    def tokens(self, text: str) -> Path:
        return write(Path(self.mktemp()) / "api_tokens.yml", text)

    def test_stringAPIKey(self) -> None:
        """
        A single string C{api_key} is one API key.
        """
        path = self.tokens("api_key: abc\nadmin_key: adm\n")
        self.assertEqual(readKeys(path), (("abc",), "adm"))

    def test_listAPIKey(self) -> None:
        """
        A list C{api_key} gives several API keys, in order.
        """
        path = self.tokens("api_key: [one, two]\nadmin_key: adm\n")
        self.assertEqual(readKeys(path), (("one", "two"), "adm"))

    def test_missingKeys(self) -> None:
        """
        A file without C{api_key} or without C{admin_key}, or with empty ones, is an error
        naming the file.
        """
        for text in [
            "admin_key: adm\n",
            "api_key: abc\n",
            "api_key: ''\nadmin_key: adm\n",
            "api_key: abc\nadmin_key: ''\n",
            "api_key: [abc, '']\nadmin_key: adm\n",
            "{}\n",
        ]:
            path = self.tokens(text)
            error = self.assertRaises(ConfigError, readKeys, path)
            self.assertIn(str(path), str(error))
            self.assertIn("needs api_key", str(error))

    def test_notAMapping(self) -> None:
        """
        A key file that is not a mapping is an error naming the file.
        """
        path = self.tokens("- abc\n")
        error = self.assertRaises(ConfigError, readKeys, path)
        self.assertIn(str(path), str(error))

    def test_nullListEntryIsNotAKey(self) -> None:
        """
        An empty entry in a list of API keys (YAML C{null}) is an error, not a key.
        """
        path = self.tokens("api_key:\n  - abc\n  -\nadmin_key: adm\n")
        self.assertRaises(ConfigError, readKeys, path)


def checkout(directory: Path, config: dict[str, Any] | None = None) -> Path:
    """
    A minimal TabbyAPI checkout: C{main.py}, and C{config.yml} when C{config} is given.
    """
    write(directory / "main.py", "")
    if config is not None:
        write(directory / "config.yml", yaml.safe_dump(config))
    return directory


class FromCheckoutTests(SynchronousTestCase):
    """
    L{TabbyInstall.fromCheckout} inspects a TabbyAPI checkout.
    """

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())

    def test_missingDirectory(self) -> None:
        """
        A directory that does not exist is an error naming it.
        """
        error = self.assertRaises(ConfigError, TabbyInstall.fromCheckout, self.directory, None)
        self.assertIn(str(self.directory), str(error))
        self.assertIn("does not exist", str(error))

    def test_noMainPy(self) -> None:
        """
        A directory without C{main.py} is not a TabbyAPI checkout.
        """
        self.directory.mkdir()
        error = self.assertRaises(ConfigError, TabbyInstall.fromCheckout, self.directory, None)
        self.assertIn(str(self.directory), str(error))
        self.assertIn("main.py", str(error))

    def test_venvPythonChosen(self) -> None:
        """
        Without an explicit interpreter, the checkout's C{venv/bin/python} runs C{main.py}.
        """
        checkout(self.directory, {"network": {"disable_auth": True}})
        venvPython = write(self.directory / "venv" / "bin" / "python", "")
        install = TabbyInstall.fromCheckout(self.directory, None)
        self.assertEqual(install.command, (str(venvPython), "main.py"))
        self.assertEqual(install.directory, self.directory)

    def test_ownPythonWithoutVenv(self) -> None:
        """
        Without a venv in the checkout, the proxy's own interpreter runs C{main.py}.
        """
        checkout(self.directory, {"network": {"disable_auth": True}})
        install = TabbyInstall.fromCheckout(self.directory, None)
        self.assertEqual(install.command, (sys.executable, "main.py"))

    def test_explicitPythonWins(self) -> None:
        """
        An interpreter given explicitly is used even when the checkout has a venv.
        """
        checkout(self.directory, {"network": {"disable_auth": True}})
        write(self.directory / "venv" / "bin" / "python", "")
        install = TabbyInstall.fromCheckout(self.directory, "/opt/python3")
        self.assertEqual(install.command, ("/opt/python3", "main.py"))

    def test_baseConfigRead(self) -> None:
        """
        TabbyAPI's own C{config.yml} is kept as the base config; none at all is an empty one.
        """
        config = {"network": {"disable_auth": True, "port": 5000}, "model": {"model_dir": "/m"}}
        checkout(self.directory, config)
        self.assertEqual(TabbyInstall.fromCheckout(self.directory, None).baseConfig, config)

    def test_badBaseConfig(self) -> None:
        """
        A C{config.yml} that is not a mapping is an error naming it.
        """
        checkout(self.directory)
        write(self.directory / "config.yml", "- a\n")
        error = self.assertRaises(ConfigError, TabbyInstall.fromCheckout, self.directory, None)
        self.assertIn(str(self.directory / "config.yml"), str(error))

    def test_disableAuth(self) -> None:
        """
        With C{network.disable_auth: true}, auth is off and no key file is created.
        """
        checkout(self.directory, {"network": {"disable_auth": True}})
        install = TabbyInstall.fromCheckout(self.directory, None)
        self.assertEqual(install.keys, Keys(enabled=False))
        self.assertFalse((self.directory / "api_tokens.yml").exists())

    def test_existingKeysRead(self) -> None:
        """
        With auth on, the keys come from the checkout's C{api_tokens.yml}.
        """
        checkout(self.directory, {"network": {"disable_auth": False}})
        write(self.directory / "api_tokens.yml", "api_key: abc\nadmin_key: adm\n")
        install = TabbyInstall.fromCheckout(self.directory, None)
        self.assertEqual(install.keys, Keys(enabled=True, apiKeys=("abc",), adminKey="adm"))

    def test_keysCreatedWhenMissing(self) -> None:
        """
        With auth on and no C{api_tokens.yml}, fresh keys are written (owner-only) and used, as
        TabbyAPI would on its first start.
        """
        checkout(self.directory)
        install = TabbyInstall.fromCheckout(self.directory, None)
        path = self.directory / "api_tokens.yml"
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        apiKeys, adminKey = readKeys(path)
        self.assertEqual(install.keys, Keys(enabled=True, apiKeys=apiKeys, adminKey=adminKey))
        self.assertEqual(len(apiKeys), 1)
        self.assertGreaterEqual(len(apiKeys[0]), 32)
        self.assertGreaterEqual(len(adminKey), 32)
        self.assertNotEqual(apiKeys[0], adminKey)

    def test_freshKeysDiffer(self) -> None:
        """
        Two checkouts get different fresh keys.
        """
        one = TabbyInstall.fromCheckout(checkout(Path(self.mktemp())), None).keys
        two = TabbyInstall.fromCheckout(checkout(Path(self.mktemp())), None).keys
        self.assertNotEqual(one.adminKey, two.adminKey)
        self.assertNotEqual(one.apiKeys, two.apiKeys)


class KeysTests(SynchronousTestCase):
    """
    L{Keys} as the proxy uses them towards TabbyAPI.
    """

    def test_upstreamHeadersWithAuth(self) -> None:
        """
        With auth on, the proxy talks to TabbyAPI with the admin key as a Bearer token.
        """
        keys = Keys(enabled=True, apiKeys=("abc",), adminKey="adm")
        self.assertEqual(dict(keys.upstreamHeaders), {b"Authorization": [b"Bearer adm"]})

    def test_upstreamHeadersWithoutAuth(self) -> None:
        """
        With auth off, no header is sent.
        """
        self.assertEqual(dict(Keys(enabled=False).upstreamHeaders), {})

    def test_adminKeyNotInRepr(self) -> None:
        """
        The admin key never shows up in a C{repr} (and so in logs).
        """
        self.assertNotIn("s3cret", repr(Keys(enabled=True, apiKeys=("abc",), adminKey="s3cret")))


def profileFrom(configDir: Path, name: str, text: str) -> Profile:
    write(configDir / f"{name}.yml", text)
    return Catalog.load(configDir).profiles[name]


class ChildConfigTests(SynchronousTestCase):
    """
    L{TabbyInstall.childConfig}: the file handed to TabbyAPI as C{--config}.
    """

    def setUp(self) -> None:
        self.profile = profileFrom(Path(self.mktemp()), "qwen", QWEN)
        self.baseConfig = {
            "network": {"host": "0.0.0.0", "port": 5000, "disable_auth": True},
            "model": {"model_dir": "/models", "model_name": "Default"},
        }
        self.install = TabbyInstall(
            directory=Path("/tabby"),
            command=("python", "main.py"),
            baseConfig=copy.deepcopy(self.baseConfig),
            keys=Keys(enabled=False),
        )

    def test_profileSectionsPlusNetwork(self) -> None:
        """
        The file holds the profile's TabbyAPI sections and a network section with the loopback
        host, the chosen port and the proxy's auth setting; nothing of the proxy's own.
        """
        document = self.install.childConfig(self.profile, 7001)
        self.assertEqual(
            document,
            {
                "model": {"model_name": "Qwen3-8B-exl3-4.0bpw", "max_seq_len": 32768},
                "draft_model": {"draft_model_name": "Qwen3-0.6B"},
                "sampling": {"override_preset": "safe_defaults"},
                "network": {"host": "127.0.0.1", "port": 7001, "disable_auth": True},
            },
        )
        self.assertNotIn("template", document)
        self.assertNotIn("unload_timer", document["model"])

    def test_profileNetworkKeptButHostAndPortForced(self) -> None:
        """
        A profile's own network settings are kept, but host, port and auth are always the proxy's.
        """
        profile = profileFrom(
            Path(self.mktemp()),
            "n",
            "model: {model_name: A}\nnetwork: {host: 0.0.0.0, port: 80, api_servers: [OAI], disable_auth: false}\n",
        )
        document = self.install.childConfig(profile, 7002)
        self.assertEqual(
            document["network"], {"host": "127.0.0.1", "port": 7002, "api_servers": ["OAI"], "disable_auth": True}
        )
        self.assertEqual(profile.tabby["network"], {"host": "0.0.0.0", "port": 80,
                                                    "api_servers": ["OAI"], "disable_auth": False})

    def test_nothingMutated(self) -> None:
        """
        Building the file changes neither the install's base config nor the profile, and the
        result is independent of both.
        """
        before = copy.deepcopy(dict(self.profile.tabby))
        document = self.install.childConfig(self.profile, 7001)
        document["model"]["model_name"] = "changed"
        document["network"]["port"] = 1
        self.assertEqual(self.install.baseConfig, self.baseConfig)
        self.assertEqual(dict(self.profile.tabby), before)
        self.assertNotIn("network", self.profile.tabby)
        self.assertEqual(self.install.childConfig(self.profile, 7001)["network"]["port"], 7001)

    def test_modelDirOverride(self) -> None:
        """
        An install with C{modelDirOverride} (the simulator's) sets C{model.model_dir}, without
        changing the profile.
        """
        install = TabbyInstall(
            directory=Path("/sim"),
            command=("python",),
            baseConfig={},
            keys=Keys(enabled=False),
            modelDirOverride="models",
        )
        document = install.childConfig(self.profile, 7003)
        self.assertEqual(document["model"]["model_dir"], "models")
        self.assertNotIn("model_dir", self.profile.modelSection)

    def test_serializable(self) -> None:
        """
        The file is plain YAML: it survives a C{safe_dump}/C{safe_load} round trip.
        """
        document = self.install.childConfig(self.profile, 7001)
        self.assertEqual(yaml.safe_load(yaml.safe_dump(document)), document)


class ModelDirectoryTests(SynchronousTestCase):
    """
    L{TabbyInstall.modelDirectory}: where TabbyAPI looks for a profile's model folder.
    """

    def test_precedence(self) -> None:
        """
        The override wins over the profile's C{model_dir}, which wins over the base config's,
        which wins over TabbyAPI's default C{models}; relative to the checkout.
        """
        configDir = Path(self.mktemp())
        plain = profileFrom(configDir, "plain", "model: {model_name: A}\n")
        own = profileFrom(configDir, "own", "model: {model_name: A, model_dir: mine}\n")

        def install(base: dict[str, Any], override: str | None = None) -> TabbyInstall:
            return TabbyInstall(Path("/tabby"), ("python",), base, Keys(enabled=False), override)

        self.assertEqual(install({}).modelDirectory(plain), Path("/tabby/models/A"))
        based = install({"model": {"model_dir": "base"}})
        self.assertEqual(based.modelDirectory(plain), Path("/tabby/base/A"))
        self.assertEqual(based.modelDirectory(own), Path("/tabby/mine/A"))
        overridden = install({"model": {"model_dir": "base"}}, "forced")
        self.assertEqual(overridden.modelDirectory(own), Path("/tabby/forced/A"))
        self.assertEqual(install({}).modelDirectory(
            profileFrom(configDir, "abs", "model: {model_name: A, model_dir: /srv/m}\n")
        ), Path("/srv/m/A"))


class ResourceTests(SynchronousTestCase):
    """
    A profile's C{gpus}, C{memory} and C{persistent}: read, checked, and kept from TabbyAPI.
    """

    def load(self, text: str) -> Profile:
        configDir = Path(self.mktemp())
        write(configDir / "m.yml", "model: {model_name: M}\n" + text)
        return Catalog.load(configDir).profiles["m"]

    def refused(self, text: str) -> str:
        configDir = Path(self.mktemp())
        write(configDir / "m.yml", "model: {model_name: M}\n" + text)
        return str(self.assertRaises(ConfigError, Catalog.load, configDir))

    def test_defaults(self) -> None:
        """
        Without them, a profile may use any GPU, has its memory estimated, and may be evicted.
        """
        profile = self.load("")
        self.assertEqual((profile.gpus, profile.memory, profile.persistent), (None, None, False))

    def test_read(self) -> None:
        """
        C{gpus} is a list of indices, C{memory} a size (on each GPU) or one size per GPU, and
        none of them reaches TabbyAPI's config.
        """
        profile = self.load("gpus: [1, 0]\nmemory: 18GiB\npersistent: true\n")
        self.assertEqual((profile.gpus, profile.memory, profile.persistent), ((1, 0), 18 * 1024**3, True))
        self.assertEqual(set(profile.tabby), {"model"})
        profile = self.load("gpus: [0, 1]\nmemory: [20GiB, 4000MiB]\n")
        self.assertEqual(profile.memory, (20 * 1024**3, 4000 * 1024**2))
        self.assertEqual(self.load("memory: 6G\n").memory, 6 * 1024**3)

    def test_refused(self) -> None:
        """
        Each wrong value is an error naming the file, the key and what it should be.
        """
        for text, message in [
            ("gpus: 0\n", "gpus must be a list of distinct GPU indices"),
            ("gpus: []\n", "gpus must be a list"),
            ("gpus: [0, 0]\n", "distinct"),
            ("gpus: [-1]\n", "gpus must be a list"),
            ("gpus: [true]\n", "gpus must be a list"),
            ("memory: 18\n", "memory: 18 is not a size"),
            ("memory: [18GiB]\n", "memory as a list gives one size per GPU of gpus"),
            ("gpus: [0, 1]\nmemory: [18GiB]\n", "found 1 size(s) for gpus [0, 1]"),
            ("gpus: [0]\nmemory: [lots]\n", "memory: 'lots' is not a size"),
            ("persistent: yes please\n", "persistent must be true or false"),
        ]:
            with self.subTest(text=text):
                found = self.refused(text)
                self.assertIn("m.yml: ", found)
                self.assertIn(message, found)
