"""
C{tabbyproxy-check}: validate the profiles and the TabbyAPI folder without starting anything.

It takes the same options as C{twistd tabbyproxy}, so a service's command line can be checked
as it is, and prints one line per finding, each profile's GPU memory (declared, or estimated and
how) among them.  It exits 0 when the proxy would start and every
profile's model folder is in place, and 1 when something would stop the start (a broken profile,
a bad option, no TabbyAPI) or a model could not load.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence, TextIO

from twisted.python import usage

from tabbyproxy.config import Profile, TabbyInstall
from tabbyproxy.memory import MemoryEstimate, declaredMemory, estimateMemory
from tabbyproxy.tap import Options


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
    for profile in options.catalog:
        if install is None:
            results.append(("ok", f"profile {profile.id}: model {profile.modelName}"))
            if profile.memory is not None:
                results.append(("ok", _resources(profile, declaredMemory(profile))))
            continue
        folder = install.modelDirectory(profile)
        if not (folder / "config.json").is_file():
            results.append(("error", f"profile {profile.id}: no config.json in {folder}; TabbyAPI would fail to load it"))
        else:
            results.append(("ok", f"profile {profile.id}: model folder {folder}"))
            results.append(("ok", _resources(profile, estimateMemory(profile, install))))
    return results


def _resources(profile: Profile, estimate: MemoryEstimate) -> str:
    gpus = "any GPU" if profile.gpus is None else "GPU " + ", ".join(str(gpu) for gpu in profile.gpus)
    persistent = ", persistent" if profile.persistent else ""
    return f"profile {profile.id}: {gpus}{persistent}, GPU memory {estimate.explain()}"


def _installFindings(install: TabbyInstall) -> list[tuple[str, str]]:
    results = [("ok", f"TabbyAPI folder {install.directory}")]
    python = install.command[0]
    if os.access(python, os.X_OK):
        results.append(("ok", f"interpreter {python}"))
    else:
        results.append(("error", f"interpreter {python} is not an executable file (--python)"))
    auth = "on: clients need a key from api_tokens.yml" if install.keys.enabled else "off (disable_auth)"
    results.append(("ok", f"auth {auth}"))
    return results


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    options = Options()
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
