"""
C{tabbyproxy-check}: validate the profiles and the TabbyAPI folder without starting anything.

It takes the same options as C{twistd tabbyproxy}, so a service's command line can be checked
as it is, and prints one line per finding, each profile's GPU memory (declared, or estimated and
how) among them.  It exits 0 when the proxy would start and every
profile's model folder is in place, and 1 when something would stop the start (a broken profile,
a bad option, no TabbyAPI) or a model could not load: no folder, or no backend for it (TabbyAPI's
interpreter cannot import C{exllamav3}, or C{exllamav2} for an exl2 model; a TabbyAPI without the
exllamav2 backend for an exl2 model; TabbyAPI's own dependency check, which refuses to start
without torch and exllamav3 unless C{developer.unsafe_launch}).  It writes nothing, not even the
C{api_tokens.yml} a start would create; it asks TabbyAPI's interpreter which packages it has.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence, TextIO

from twisted.python import usage

from tabbyproxy.config import Profile, TabbyInstall
from tabbyproxy.memory import MemoryEstimate, declaredMemory, estimateMemory
from tabbyproxy.modelinfo import modelDetails
from tabbyproxy.tabbywire import causeLine
from tabbyproxy.tap import Options

# Asked of TabbyAPI's interpreter as TabbyAPI's own dependency check asks (find_spec imports nothing).
_FIND_PACKAGES = ("import importlib.util, json; "
                  "print(json.dumps({name: importlib.util.find_spec(name) is not None "
                  "for name in ('torch', 'exllamav3', 'exllamav2')}))")
# How long TabbyAPI's interpreter may take to answer (importing a backend imports torch).
_ASK_TIMEOUT = 300.0


class CheckOptions(Options):
    """
    The options of C{twistd tabbyproxy}, read without creating any file.
    """

    createsFiles = False


def findings(options: Options) -> list[tuple[str, str]]:
    """
    What a start with these options would run into, beyond the checks of the options themselves:
    (C{"ok"} or C{"error"}, message) pairs.
    """
    install = options.install
    results: list[tuple[str, str]] = []
    if install is None:
        results.append(("ok", "--simulate: the bundled simulator stands in for TabbyAPI"))
    else:
        results.extend(_installFindings(install))
    exl2 = []
    for profile in options.catalog:
        if install is None:
            results.append(("ok", f"profile {profile.id}: model {profile.modelName}"))
            if profile.memory is not None:
                results.append(("ok", _resources(profile, declaredMemory(profile))))
            continue
        folder = install.modelDirectory(profile)
        if not (folder / "config.json").is_file():
            results.append(("error", f"profile {profile.id}: no config.json in {folder}; TabbyAPI would fail to load it"))
            continue
        results.append(("ok", f"profile {profile.id}: model folder {folder}"))
        results.append(("ok", _resources(profile, estimateMemory(profile, install))))
        if modelDetails(profile, folder)["format"] == "exl2":
            exl2.append(profile.id)
    if install is not None:
        results.extend(_backendFindings(install, exl2))
    return results


def _resources(profile: Profile, estimate: MemoryEstimate) -> str:
    gpus = "any GPU" if profile.gpus is None else "GPU " + ", ".join(str(gpu) for gpu in profile.gpus)
    persistent = ", persistent" if profile.persistent else ""
    return f"profile {profile.id}: {gpus}{persistent}, GPU memory {estimate.explain()}"


def _ask(install: TabbyInstall, code: str) -> tuple[bool, str]:
    """
    Run C{code} in TabbyAPI's interpreter, in its folder: whether it succeeded, and its output
    (or why it failed).
    """
    try:
        done = subprocess.run([install.command[0], "-c", code], cwd=install.directory, capture_output=True,
                              text=True, timeout=_ASK_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if done.returncode != 0:
        return False, causeLine(done.stderr.splitlines()) or f"exit status {done.returncode}"
    return True, done.stdout


def _backendFindings(install: TabbyInstall, exl2: list[str]) -> list[tuple[str, str]]:
    """
    Whether TabbyAPI's interpreter has what loads need: torch and exllamav3 (TabbyAPI's own
    check refuses to start without them unless C{developer.unsafe_launch}), exllamav3 importable,
    and for the exl2 models (C{exl2}, profile ids) the exllamav2 backend in TabbyAPI and
    exllamav2 importable.
    """
    python = install.command[0]
    answered, output = _ask(install, _FIND_PACKAGES)
    if not answered:
        return [("error", f"interpreter {python} cannot tell which packages it has: {output}")]
    try:
        installed = json.loads(output)
    except ValueError:
        return [("error", f"interpreter {python} answered {output.strip()!r} when asked which packages it has")]
    results = []
    missing = [name for name in ("torch", "exllamav3") if not installed.get(name)]
    developer = install.baseConfig.get("developer") or {}
    if missing and developer.get("unsafe_launch") is not True:
        results.append(("error", f"TabbyAPI would refuse to start: {python} has no {' or '.join(missing)} "
                                 "(\"Inference dependencies for TabbyAPI are not installed\"); install them with "
                                 "TabbyAPI's update_scripts, or set developer.unsafe_launch in its config.yml to "
                                 "skip that check"))
    wanted = [("exllamav3", "every model")] if installed.get("exllamav3") or not exl2 else []
    if exl2:
        names = ", ".join(exl2)
        if not (install.directory / "backends" / "exllamav2").is_dir():
            results.append(("error", f"profiles {names}: exl2 models, and this TabbyAPI has no exllamav2 backend "
                                     "(removed in July 2026); use exl3 models or a TabbyAPI that still has it"))
        else:
            wanted.append(("exllamav2", f"the exl2 models of {names}"))
    for package, forWhat in wanted:
        if not installed.get(package):
            results.append(("error", f"{python} has no {package}: {forWhat} would fail to load"))
            continue
        imported, problem = _ask(install, f"import {package}")
        if imported:
            results.append(("ok", f"{python} imports {package}"))
        else:
            results.append(("error", f"{python} cannot import {package} ({problem}): {forWhat} would fail to load"))
    return results


def _installFindings(install: TabbyInstall) -> list[tuple[str, str]]:
    results = [("ok", f"TabbyAPI folder {install.directory}")]
    python = install.command[0]
    if os.access(python, os.X_OK):
        results.append(("ok", f"interpreter {python}"))
    else:
        results.append(("error", f"interpreter {python} is not an executable file (--python)"))
    auth = "on: clients need a key from api_tokens.yml" if install.keys.enabled else "off (disable_auth)"
    if install.keys.enabled and not install.keys.adminKey:
        auth += " (it does not exist yet: a start creates it with fresh keys)"
    results.append(("ok", f"auth {auth}"))
    return results


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    options = CheckOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else list(argv))
    except usage.UsageError as e:
        out.write(f"error: {e}\n")
        return 1
    results = findings(options)
    for level, message in results:
        out.write(f"{level}: {message}\n")
    profiles = len(options.catalog.profiles)
    failed = any(level == "error" for level, _ in results)
    out.write(f"{'FAILED' if failed else 'OK'}: {profiles} profile(s) in {options['config-dir']}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
