"""
The C{nvidia-smi} probe against a real process: the fake C{nvidia-smi} of C{tests/support/bin},
found on the C{PATH} and answering what the test wrote.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tabbyproxy.gpus import GpuProbeError, NvidiaSmi
from tabbyproxy.sizes import MiB
from tests.support.gpus import fakeNvidiaSmiEnvironment


class NvidiaSmiProcessTests(TestCase):
    """
    L{NvidiaSmi.find} and L{NvidiaSmi.read} with a real child process.
    """

    async def test_readsTheFake(self) -> None:
        """
        The probe finds the fake on the PATH, runs both queries with the arguments the real
        nvidia-smi takes, and reads its answers.
        """
        environ = fakeNvidiaSmiEnvironment(Path(self.mktemp()), {
            "--query-gpu=index,uuid,memory.total,memory.used": "0, GPU-a, 81559, 4000\n1, GPU-b, 81559, 0\n",
            "--query-compute-apps=pid,gpu_uuid,used_memory": "31337, GPU-a, 3500\n",
        })
        probe = NvidiaSmi.find(reactor, environ)
        assert probe is not None
        reading = await probe.read()
        self.assertEqual(reading.capacity([31337]), {0: (81559 - 500) * MiB, 1: 81559 * MiB})
        self.assertEqual(reading.usedBy(31337), {0: 3500 * MiB})

    async def test_failingFake(self) -> None:
        """
        An nvidia-smi that fails is a clear error with its last line.
        """
        environ = fakeNvidiaSmiEnvironment(Path(self.mktemp()), {"exit": 6, "error": "No devices were found"})
        probe = NvidiaSmi.find(reactor, environ)
        assert probe is not None
        with self.assertRaises(GpuProbeError) as caught:
            await probe.read()
        self.assertIn("exit status 6: No devices were found", str(caught.exception))
