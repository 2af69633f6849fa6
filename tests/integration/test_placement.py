"""
Several models at once (issue 13) with the simulator as real children on fake GPUs
(C{--simulate-gpus}): concurrent clients over profiles where only some combinations fit.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tests.support.logs import CapturedEvents
from tests.support.processes import pidAlive, reactor
from tests.support.proxy import RunningProxy

CLIENTS = 30

# Two GPUs of 24 GiB.  chat, code and embed fit together (14 + 14 + 4 of 48 GiB); big needs 30,
# so one 14 GiB model must make room; tiny (2) then needs another one gone.
PROFILES: dict[str, dict[str, Any]] = {
    name: {"model": {"model_name": name.capitalize() + "-exl3"}, "memory": memory,
           "simulator": {"token_delay": 0.002}}
    for name, memory in (("chat", "14GiB"), ("code", "14GiB"), ("embed", "4GiB"), ("big", "30GiB"), ("tiny", "2GiB"))
}


class PlacementTests(TestCase):
    timeout = 120

    async def test_threeHundredRequestsOverFiveProfiles(self) -> None:
        """
        300 requests from 30 concurrent clients over 5 profiles, streaming and not, in three
        phases: chat, code and embed together (they fit: three children at once, no stop); then
        big and embed (big evicts the idle one of chat and code used longest ago); then tiny
        and big (tiny evicts the last idle 14 GiB model).  Every answer is complete and from
        the model asked for (the simulator's text starts with its model folder name), no stream
        is cut, the starts are the five the rules predict, and no child outlives the proxy.
        """
        events = CapturedEvents(self)
        proxy = RunningProxy(self, PROFILES, "--simulate-gpus", "2x24GiB")
        failures: list[str] = []
        chooser = random.Random(13)

        async def one(client: int, model: str) -> None:
            problem = await proxy.answerProblem(model, f"client {client}", 8, streaming=client % 2 == 0)
            if problem is not None:
                failures.append(f"client {client} {problem}")

        async def client(number: int, models: tuple[str, ...], requests: int) -> None:
            for _ in range(requests):
                await one(number, chooser.choice(models))

        async def phase(models: tuple[str, ...], requests: int) -> None:
            clients = [Deferred.fromCoroutine(client(number, models, requests // CLIENTS))
                       for number in range(CLIENTS)]
            await gatherResults(clients).addTimeout(60, reactor)

        await phase(("chat", "code", "embed"), 150)
        self.assertEqual(sorted(events.starts()), ["chat", "code", "embed"])
        self.assertEqual(events.stops(), [])
        self.assertEqual(len(proxy.scheduler.status()["children"]), 3)
        lastUsed = [model.profile.id for model in proxy.scheduler.snapshot() if model.profile.id in ("chat", "code")]

        await phase(("big", "embed"), 90)
        # The less recently used of chat and code made room.
        self.assertEqual(events.stops(), ["making room for big"])
        self.assertEqual(sorted(model.profile.id for model in proxy.scheduler.snapshot()),
                         sorted(["big", "embed", lastUsed[0]]))

        await phase(("tiny", "big"), 60)
        self.assertEqual(events.stops(), ["making room for big", "making room for tiny"])
        self.assertEqual(failures, [])
        self.assertEqual(events.starts()[3:], ["big", "tiny"])
        self.assertEqual(proxy.scheduler.starts, 5)
        status = proxy.scheduler.status()
        self.assertEqual(sorted(child["model"] for child in status["children"]), ["big", "embed", "tiny"])
        self.assertEqual((status["in_flight"], status["waiting"], status["last_error"]), (0, 0, None))
        self.assertEqual(sum(gpu["accounted_bytes"] for gpu in status["gpus"]), (30 + 4 + 2) * 2**30)

        pids = [child["pid"] for child in status["children"]]
        await proxy.service.stopService()
        self.assertEqual([pid for pid in pids if pidAlive(pid)], [])
