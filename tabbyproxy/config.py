"""
The proxy's view of its files: per-model profiles in the config directory, and the TabbyAPI
checkout (its ``config.yml`` and ``api_tokens.yml``) that runs them.

A profile ``config/<id>.yml`` holds TabbyAPI sections (``model``, ``draft_model``, ``sampling``,
...) that are handed to TabbyAPI as they are, plus three things of the proxy's own that never reach
TabbyAPI: ``model.unload_timer`` (the idle time), the ``template`` section (request defaults and
the system prompt), ``aliases`` (other names clients may ask for the model by, such as the
``claude-...`` or ``gpt-...`` names coding agents send), and the model's resources: ``gpus`` (the
GPUs its TabbyAPI may use), ``memory`` (what it needs on each of them, or a list, one per GPU) and
``persistent`` (never evicted to make room for another model).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml
from attrs import field, frozen

from tabbyproxy.keepalive import KeepAliveError, parseKeepAlive
from tabbyproxy.sizes import SizeError, parseSize

DEFAULT_CONTEXT_LENGTH = 8192
"""TabbyAPI's context length for a model whose profile and config.json set none."""

_PROXY_ONLY_SECTIONS = frozenset({"template", "aliases", "gpus", "memory", "persistent"})
_PROXY_ONLY_MODEL_KEYS = frozenset({"unload_timer"})


class ConfigError(Exception):
    """
    A file the proxy needs is missing or wrong; the message names the file and the problem.
    """


@frozen
class Profile:
    """
    One model the proxy can start: the contents of C{config/<id>.yml}.

    @ivar id: the file's path under the config directory without C{.yml}, C{/}-separated.
    @ivar tabby: the sections passed to TabbyAPI, without the proxy's own keys.
    @ivar template: request defaults (sampler values, C{system}, C{system_time}).
    @ivar unloadTimer: the profile's idle time in seconds, or C{None} to use the global one.
    @ivar aliases: other names that resolve to this profile.
    @ivar gpus: the GPUs (C{nvidia-smi} indices) its TabbyAPI may use, or C{None} for any.
    @ivar memory: the bytes it needs: on each of C{gpus} (one figure), one per GPU of C{gpus}
        (a tuple), or in all when it names no GPUs; C{None} to estimate it from the model folder.
    @ivar persistent: never evicted to make room for another model.
    """

    id: str
    path: Path
    tabby: Mapping[str, Any]
    template: Mapping[str, Any]
    unloadTimer: float | None
    aliases: tuple[str, ...] = ()
    gpus: tuple[int, ...] | None = None
    memory: int | tuple[int, ...] | None = None
    persistent: bool = False

    @property
    def modelName(self) -> str:
        return str(self.tabby["model"]["model_name"])

    @property
    def modelSection(self) -> Mapping[str, Any]:
        section: Mapping[str, Any] = self.tabby["model"]
        return section


def _readYAML(path: Path) -> Any:
    try:
        with path.open("rb") as stream:
            return yaml.safe_load(stream)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror}") from e


def loadProfile(configDir: Path, path: Path) -> Profile:
    """
    Read and check one profile file.

    @raise ConfigError: when the file is not valid YAML, lacks C{model.model_name}, or lies
        outside C{configDir} once symbolic links are resolved.
    """
    root = configDir.resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(f"{path}: resolves to {resolved}, outside the config directory {root}")
    profileId = path.relative_to(configDir).with_suffix("").as_posix()
    if ".." in profileId.split("/") or "\0" in profileId:
        raise ConfigError(f"{path}: the id {profileId!r} would escape the config directory")

    document = _readYAML(path)
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, found {_kind(document)}")
    model = document.get("model")
    if not isinstance(model, dict) or not model.get("model_name"):
        raise ConfigError(f"{path}: model.model_name is missing (which model folder to load?)")
    template = document.get("template")
    if template is None:
        template = {}
    if not isinstance(template, dict):
        raise ConfigError(f"{path}: template must be a mapping, found {_kind(template)}")

    aliases = document.get("aliases")
    if aliases is None:
        aliases = []
    if not isinstance(aliases, list) or not all(isinstance(alias, str) and alias for alias in aliases):
        raise ConfigError(f"{path}: aliases must be a list of model names, found {_kind(aliases)}")

    unloadTimer: float | None = None
    if model.get("unload_timer") is not None:
        try:
            unloadTimer = parseKeepAlive(model["unload_timer"])
        except KeepAliveError as e:
            raise ConfigError(f"{path}: model.unload_timer: {e}") from e

    tabby = {
        section: value
        for section, value in document.items()
        if section not in _PROXY_ONLY_SECTIONS
    }
    tabby["model"] = {
        key: value for key, value in model.items() if key not in _PROXY_ONLY_MODEL_KEYS
    }
    return Profile(
        id=profileId,
        path=path,
        tabby=tabby,
        template=template,
        unloadTimer=unloadTimer,
        aliases=tuple(aliases),
        **_resources(path, document),
    )


def _resources(path: Path, document: Mapping[str, Any]) -> dict[str, Any]:
    """
    A profile's C{gpus}, C{memory} and C{persistent}, checked.
    """
    gpus = document.get("gpus")
    if gpus is not None:
        if not (isinstance(gpus, list) and gpus and len(set(gpus)) == len(gpus)
                and all(isinstance(gpu, int) and not isinstance(gpu, bool) and gpu >= 0 for gpu in gpus)):
            raise ConfigError(f"{path}: gpus must be a list of distinct GPU indices such as [0, 1], found {gpus!r}")
        gpus = tuple(gpus)
    memory = document.get("memory")
    try:
        if isinstance(memory, list):
            if gpus is None or len(memory) != len(gpus):
                raise ConfigError(f"{path}: memory as a list gives one size per GPU of gpus, "
                                  f"found {len(memory)} size(s) for gpus {list(gpus) if gpus else 'not given'}")
            memory = tuple(parseSize(size) for size in memory)
        elif memory is not None:
            memory = parseSize(memory)
    except SizeError as e:
        raise ConfigError(f"{path}: memory: {e}") from e
    persistent = document.get("persistent", False)
    if not isinstance(persistent, bool):
        raise ConfigError(f"{path}: persistent must be true or false, found {persistent!r}")
    return {"gpus": gpus, "memory": memory, "persistent": persistent}


def _kind(value: object) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def _profilePaths(configDir: Path) -> Iterator[Path]:
    visited: set[str] = set()
    for directory, subdirectories, files in os.walk(configDir, followlinks=True):
        real = os.path.realpath(directory)
        if real in visited:
            # A symbolic link back to a folder already read: reading it again would never end.
            subdirectories.clear()
            continue
        visited.add(real)
        subdirectories.sort()
        for name in sorted(files):
            if name.endswith(".yml") and not name.startswith("."):
                yield Path(directory) / name


@frozen
class Catalog:
    """
    Every profile, by id, and the rules that turn a client's model name into one.

    @ivar aliases: each alias to the id of the profile that lists it: the first one, in the
        order of the files, when two list the same; never a profile's own id.
    """

    profiles: Mapping[str, Profile]
    aliases: Mapping[str, str] = field(init=False)

    def __attrs_post_init__(self) -> None:
        aliases: dict[str, str] = {}
        for profile in self.profiles.values():
            for alias in profile.aliases:
                if alias not in self.profiles:
                    aliases.setdefault(alias, profile.id)
        object.__setattr__(self, "aliases", aliases)

    def aliasProblems(self) -> list[str]:
        """
        One message per alias that cannot mean the profile listing it: another profile's id,
        or an alias an earlier profile already claimed.
        """
        problems = []
        for profile in self.profiles.values():
            for alias in profile.aliases:
                owner = alias if alias in self.profiles else self.aliases.get(alias)
                if owner != profile.id:
                    problems.append(f"{profile.path}: the alias {alias!r} already names the profile {owner!r}")
        return problems

    @classmethod
    def load(cls, configDir: Path) -> Catalog:
        """
        Read every C{*.yml} under C{configDir}, recursively.

        @raise ConfigError: for the first broken profile, or a missing directory.
        """
        if not configDir.is_dir():
            raise ConfigError(f"{configDir}: the config directory does not exist")
        profiles = {}
        for path in _profilePaths(configDir):
            profile = loadProfile(configDir, path)
            profiles[profile.id] = profile
        catalog = cls(profiles=profiles)
        problems = catalog.aliasProblems()
        if problems:
            raise ConfigError(problems[0])
        return catalog

    def reloaded(self, configDir: Path) -> tuple[Catalog, list[str]]:
        """
        The profiles as they are on disk now, for a reload while the proxy runs: new files
        appear, removed files disappear, and a file that is now broken keeps its previous
        profile (if it had one) instead of stopping anything.

        @return: the new catalog and one message per broken file.
        """
        if not configDir.is_dir():
            return self, [f"{configDir}: the config directory does not exist; kept every profile"]
        profiles: dict[str, Profile] = {}
        problems = []
        for path in _profilePaths(configDir):
            try:
                profile = loadProfile(configDir, path)
            except ConfigError as e:
                previous = self.profiles.get(path.relative_to(configDir).with_suffix("").as_posix())
                if previous is not None:
                    profiles[previous.id] = previous
                problems.append(f"{e}; {'kept the previous version' if previous else 'skipped'}")
                continue
            profiles[profile.id] = profile
        catalog = Catalog(profiles=profiles)
        return catalog, problems + catalog.aliasProblems()

    def resolve(self, name: object) -> Profile | None:
        """
        The profile a client means by C{name}, on every API: its id or one of its aliases, or
        either with an Ollama tag (C{"id:latest"}, or C{"id:tag"} when a profile is named
        C{id:tag}).  As in Ollama, case does not matter, surrounding spaces are ignored, and
        C{library/} and C{registry.ollama.ai/library/} (Ollama's default namespace and host) may
        come before the name.  This is the one place names are resolved; it only looks names up,
        so no name reaches a file.
        """
        if not isinstance(name, str):
            return None
        name = name.strip()
        for prefix in ("registry.ollama.ai/", "library/"):
            if name[: len(prefix)].casefold() == prefix:
                name = name[len(prefix):]
            found = self._byName(name)
            if found is None and name[-len(":latest"):].casefold() == ":latest":
                found = self._byName(name[: -len(":latest")])
            if found is not None:
                return found
        return None

    def _byName(self, name: str) -> Profile | None:
        if not name:
            return None
        found = self.profiles.get(name)
        if found is None and name in self.aliases:
            found = self.profiles[self.aliases[name]]
        if found is None:
            folded = name.casefold()
            for known in (*self.profiles, *self.aliases):
                if known.casefold() == folded:
                    return self._byName(known)
        return found

    def __iter__(self) -> Iterator[Profile]:
        return iter(self.profiles.values())


@frozen
class Keys:
    """
    TabbyAPI's keys from C{api_tokens.yml}: the proxy checks clients against them and uses the
    admin key itself to talk to TabbyAPI.  C{enabled} is false when TabbyAPI's auth is disabled.
    """

    enabled: bool
    apiKeys: tuple[str, ...] = field(default=(), repr=False)
    adminKey: str = field(default="", repr=False)

    @property
    def upstreamHeaders(self) -> Mapping[bytes, list[bytes]]:
        if not self.enabled:
            return {}
        return {b"Authorization": [b"Bearer " + self.adminKey.encode("utf-8")]}


def readKeys(path: Path) -> tuple[tuple[str, ...], str]:
    """
    The API keys (a string or a list in the file) and the admin key in C{api_tokens.yml}.
    """
    document = _readYAML(path)
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected api_key and admin_key, found {_kind(document)}")
    apiKey = document.get("api_key")
    adminKey = document.get("admin_key")
    apiKeys = tuple(apiKey) if isinstance(apiKey, list) else (apiKey,)
    keys = (*apiKeys, adminKey)
    if not apiKeys or not all(isinstance(key, str) and key for key in keys):
        raise ConfigError(f"{path}: needs api_key (a key or a list of keys) and admin_key, all non-empty strings")
    return tuple(str(key) for key in apiKeys), str(adminKey)


def writePrivate(path: Path, text: str) -> None:
    """
    Write C{text} to C{path}, readable and writable by its owner only (0600), whatever the umask.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # An existing file keeps its mode through O_CREAT; make sure it is private too.
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)


def makePrivateDirectories(base: Path, path: Path) -> None:
    """
    Create C{path} and the directories between it and C{base}, each readable by its owner only.
    """
    current = base
    for part in path.relative_to(base).parts:
        current = current / part
        if not current.is_dir():
            current.mkdir(mode=0o700)
            current.chmod(0o700)


def writeNewKeys(path: Path) -> None:
    """
    Create C{api_tokens.yml} with fresh keys, as TabbyAPI does on its first start, readable by
    its owner only.
    """
    document = {"api_key": secrets.token_hex(16), "admin_key": secrets.token_hex(16)}
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        yaml.safe_dump(document, stream)


@frozen
class TabbyInstall:
    """
    A TabbyAPI checkout (or the simulator's private stand-in) and how to run it.

    @ivar directory: the working directory of the child; holds C{config.yml}.
    @ivar command: the program and leading arguments; C{--config FILE} is appended.
    @ivar baseConfig: TabbyAPI's own C{config.yml}, which it merges under the proxy's file.
    """

    directory: Path
    command: tuple[str, ...]
    baseConfig: Mapping[str, Any]
    keys: Keys
    modelDirOverride: str | None = None

    @classmethod
    def fromCheckout(cls, directory: Path, python: str | None, createKeys: bool = True) -> TabbyInstall:
        """
        Inspect a TabbyAPI checkout: C{main.py}, C{config.yml} and C{api_tokens.yml}.

        @param python: the interpreter to run TabbyAPI with; by default the checkout's
            C{venv/bin/python} when it exists, else the proxy's own.
        @param createKeys: whether to create a missing C{api_tokens.yml} (as a start does); if
            not, the install has auth on and no keys yet.
        @raise ConfigError: when the checkout or one of its files is unusable.
        """
        if not directory.is_dir():
            raise ConfigError(f"{directory}: the TabbyAPI directory does not exist")
        if not (directory / "main.py").is_file():
            raise ConfigError(f"{directory}: no main.py here; is this a TabbyAPI checkout?")
        if python is None:
            venvPython = directory / "venv" / "bin" / "python"
            python = str(venvPython) if venvPython.exists() else sys.executable
        return cls.inDirectory(directory, (python, "main.py"), cls._readBaseConfig(directory), createKeys=createKeys)

    @classmethod
    def inDirectory(
        cls, directory: Path, command: tuple[str, ...], baseConfig: Mapping[str, Any],
        modelDirOverride: str | None = None, createKeys: bool = True,
    ) -> TabbyInstall:
        """
        The install whose child runs C{command} in C{directory} under C{baseConfig}, with the keys
        that config asks for (C{api_tokens.yml} in C{directory}, created as TabbyAPI would unless
        not C{createKeys}).
        """
        return cls(
            directory=directory,
            command=command,
            baseConfig=baseConfig,
            keys=cls._keysFor(directory, baseConfig, createKeys),
            modelDirOverride=modelDirOverride,
        )

    @staticmethod
    def _readBaseConfig(directory: Path) -> Mapping[str, Any]:
        path = directory / "config.yml"
        if not path.exists():
            return {}
        document = _readYAML(path) or {}
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, found {_kind(document)}")
        return document

    @staticmethod
    def _keysFor(directory: Path, baseConfig: Mapping[str, Any], createKeys: bool) -> Keys:
        network = baseConfig.get("network") or {}
        if network.get("disable_auth") is True:
            return Keys(enabled=False)
        path = directory / "api_tokens.yml"
        if not path.exists():
            if not createKeys:
                return Keys(enabled=True)
            writeNewKeys(path)
        apiKeys, adminKey = readKeys(path)
        return Keys(enabled=True, apiKeys=apiKeys, adminKey=adminKey)

    def modelDirectory(self, profile: Profile) -> Path:
        """
        Where TabbyAPI will look for the profile's model folder.
        """
        baseModel = self.baseConfig.get("model") or {}
        modelDir = (
            self.modelDirOverride
            or profile.modelSection.get("model_dir")
            or baseModel.get("model_dir")
            or "models"
        )
        return self.directory / str(modelDir) / profile.modelName

    def childConfig(self, profile: Profile, port: int) -> dict[str, Any]:
        """
        The file the proxy hands TabbyAPI as C{--config}: the profile's TabbyAPI sections and the
        loopback address the proxy chose.  TabbyAPI merges it over its own C{config.yml}.
        """
        document: dict[str, Any] = {
            section: dict(value) if isinstance(value, Mapping) else value
            for section, value in profile.tabby.items()
        }
        network = dict(document.get("network") or {})
        # The proxy decides auth from TabbyAPI's own config.yml; a profile must not change it
        # behind the proxy's back.
        network.update(host="127.0.0.1", port=port, disable_auth=not self.keys.enabled)
        document["network"] = network
        if self.modelDirOverride is not None:
            document["model"]["model_dir"] = self.modelDirOverride
        return document
