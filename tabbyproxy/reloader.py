"""
The profiles the proxy serves, re-read from the config directory on SIGHUP.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from tabbyproxy.config import Catalog
from tabbyproxy.simulator.install import addModelFolders
from tabbyproxy.scheduler import Scheduler


class ProfileReloader(Service):
    """
    Holds the current profiles and re-reads them on SIGHUP: new profiles appear, removed ones
    disappear (a removed model that runs is unloaded once its requests are done), a changed
    profile takes effect at its model's next start, and a broken file keeps its previous profile.
    """

    log = Logger()

    def __init__(self, catalog: Catalog, configDir: Path, scheduler: Scheduler, simulated: bool) -> None:
        self.catalog = catalog
        self.configDir = configDir
        self.scheduler = scheduler
        self.simulated = simulated
        self._previousHandler: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        def onHangUp(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.reload)  # type: ignore[attr-defined]

        self._previousHandler = signal.signal(signal.SIGHUP, onHangUp)

    def stopService(self) -> None:
        super().stopService()
        if self._previousHandler is not None:
            signal.signal(signal.SIGHUP, self._previousHandler)
            self._previousHandler = None

    def reload(self) -> None:
        """
        Re-read the config directory now.
        """
        old = self.catalog.profiles
        catalog, problems = self.catalog.reloaded(self.configDir)
        for problem in problems:
            self.log.error("Profile reload: {problem}", problem=problem)
        new = catalog.profiles
        if self.simulated:
            addModelFolders(self.scheduler.install, catalog)
        self.catalog = catalog
        added = sorted(new.keys() - old.keys())
        removed = sorted(old.keys() - new.keys())
        changed = sorted(key for key in new.keys() & old.keys() if new[key] != old[key])
        self.log.info(
            "Reloaded the profiles in {directory}: added {added}, removed {removed}, changed {changed}",
            directory=str(self.configDir), added=added, removed=removed, changed=changed,
        )
        for running in self.scheduler.snapshot():
            if running.profile.id in removed:
                self.log.info("Unloading {model}: its profile was removed", model=running.profile.id)
                self.scheduler.unload(running.profile.id)
