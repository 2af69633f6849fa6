"""
Tests for L{tabbyproxy.gpus}: C{nvidia-smi}'s output parsed (and refused clearly when it is not
what the proxy expects), the probe run through a fake process reactor, the fixed capacities of
C{--gpu-memory} and C{--simulate-gpus}, and a child's GPU environment.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import IReactorProcess
from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.gpus import (
    GPU_QUERY,
    PROCESS_QUERY,
    FixedGpus,
    Gpu,
    GpuProbeError,
    GpuProcess,
    GpuReading,
    NvidiaSmi,
    childEnvironment,
    chooseProbe,
    parseGpuLines,
    parseGpuMemory,
    parseProcessLines,
    parseSimulatedGpus,
)
from tabbyproxy.sizes import GiB, MiB
from tests.support.fakes import FakeProcessReactor
from tests.support.gpus import FAKE_NVIDIA_SMI_DIRECTORY

GPUS = "0, GPU-aaaa, 24564, 1200\n1, GPU-bbbb, 24564, 9000\n"
"""Two GPUs as C{nvidia-smi} prints them with L{GPU_QUERY} (MiB, a space after each comma)."""

APPS = "4242, GPU-aaaa, 800\n4242, GPU-bbbb, 8000\n777, GPU-bbbb, [N/A]\n"


class ParseTests(SynchronousTestCase):
    """
    C{nvidia-smi}'s CSV read into GPUs and processes.
    """

    def test_gpus(self) -> None:
        """
        Each line is an index, a UUID, the total and the used MiB.
        """
        gpus, indices = parseGpuLines(GPUS)
        self.assertEqual(gpus, (Gpu(0, 24564 * MiB, 1200 * MiB), Gpu(1, 24564 * MiB, 9000 * MiB)))
        self.assertEqual(indices, {"GPU-aaaa": 0, "GPU-bbbb": 1})

    def test_processes(self) -> None:
        """
        A process on two GPUs has a line for each; one whose memory is not reported is left out.
        """
        _, indices = parseGpuLines(GPUS)
        self.assertEqual(parseProcessLines(APPS, indices),
                         (GpuProcess(4242, 0, 800 * MiB), GpuProcess(4242, 1, 8000 * MiB)))
        self.assertEqual(parseProcessLines("", indices), ())

    def test_malformed(self) -> None:
        """
        Output that is not what the queries ask for is a L{GpuProbeError} quoting the line, not
        a crash.
        """
        _, indices = parseGpuLines(GPUS)
        for output in ("", "0, GPU-aaaa, 24564\n", "x, GPU-aaaa, 1, 2\n", "0, GPU-aaaa, [N/A], 2\n",
                       "No devices were found\n"):
            with self.subTest(output=output):
                self.assertRaises(GpuProbeError, parseGpuLines, output)
        for output in ("4242, GPU-cccc, 800\n", "pid, GPU-aaaa, 800\n", "4242, GPU-aaaa, 8 MiB\n", "4242\n"):
            with self.subTest(output=output):
                self.assertRaises(GpuProbeError, parseProcessLines, output, indices)
        error = self.assertRaises(GpuProbeError, parseGpuLines, "0, GPU-aaaa, 24564\n")
        self.assertIn("'0, GPU-aaaa, 24564'", str(error))


class ReadingTests(SynchronousTestCase):
    """
    What a reading says to the scheduler.
    """

    def test_capacity(self) -> None:
        """
        A measured GPU's capacity for the children is its total less what other processes use;
        the children's own use stays theirs to account.
        """
        _, indices = parseGpuLines(GPUS)
        reading = GpuReading(parseGpuLines(GPUS)[0], parseProcessLines(APPS, indices), measured=True)
        self.assertEqual(reading.capacity([4242]), {0: (24564 - 400) * MiB, 1: (24564 - 1000) * MiB})
        self.assertEqual(reading.capacity(), {0: (24564 - 1200) * MiB, 1: (24564 - 9000) * MiB})
        self.assertEqual(reading.usedBy(4242), {0: 800 * MiB, 1: 8000 * MiB})
        self.assertEqual(reading.usedBy(1), {})

    def test_fixed(self) -> None:
        """
        Fixed GPUs have their given sizes as capacity, and nothing measured.
        """
        reading = self.successResultOf(FixedGpus({1: 16 * GiB, 0: 24 * GiB}).read())
        self.assertEqual(reading, GpuReading((Gpu(0, 24 * GiB, 0), Gpu(1, 16 * GiB, 0))))
        self.assertEqual(reading.capacity([1]), {0: 24 * GiB, 1: 16 * GiB})


class NvidiaSmiTests(SynchronousTestCase):
    """
    L{NvidiaSmi} runs the two queries through the process reactor.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        # The fake spawns as IReactorProcess says without declaring it (as the scheduler's tests use it).
        self.processes = cast(IReactorProcess, self.reactor)
        self.probe = NvidiaSmi("/usr/bin/nvidia-smi", self.processes, {"PATH": "/usr/bin"})

    def test_read(self) -> None:
        """
        The GPU query, then the process query, each parsed once the process exits.
        """
        reading = self.probe.read()
        [gpuQuery] = self.reactor.spawned
        self.assertEqual(gpuQuery.args, ["/usr/bin/nvidia-smi", *GPU_QUERY])
        gpuQuery.print(GPUS)
        gpuQuery.exit(0)
        processQuery = self.reactor.spawned[1]
        self.assertEqual(processQuery.args, ["/usr/bin/nvidia-smi", *PROCESS_QUERY])
        processQuery.print(APPS)
        processQuery.exit(0)
        result = self.successResultOf(reading)
        self.assertTrue(result.measured)
        self.assertEqual(result.usedBy(4242), {0: 800 * MiB, 1: 8000 * MiB})

    def test_failure(self) -> None:
        """
        A failing C{nvidia-smi} is a L{GpuProbeError} with its exit status and last line.
        """
        reading = self.probe.read()
        [gpuQuery] = self.reactor.spawned
        gpuQuery.protocol.childDataReceived(2, b"NVIDIA-SMI has failed because it couldn't communicate with the driver\n")
        gpuQuery.exit(9)
        error = self.failureResultOf(reading, GpuProbeError).value
        self.assertIn("exit status 9: NVIDIA-SMI has failed", str(error))

    def test_signal(self) -> None:
        """
        An C{nvidia-smi} killed by a signal is a L{GpuProbeError} naming it.
        """
        reading = self.probe.read()
        self.reactor.spawned[0].exit(signal=9)
        self.assertIn("signal 9", str(self.failureResultOf(reading, GpuProbeError).value))

    def test_find(self) -> None:
        """
        Without C{nvidia-smi} on the C{PATH} there is no probe.
        """
        self.assertIsNone(NvidiaSmi.find(self.processes, {"PATH": self.mktemp()}))


class OptionTests(SynchronousTestCase):
    """
    C{--gpu-memory}, C{--simulate-gpus} and the child's environment.
    """

    def test_gpuMemory(self) -> None:
        """
        C{--gpu-memory} takes INDEX=SIZE pairs.
        """
        self.assertEqual(parseGpuMemory("0=24GiB, 1=24000MiB"), {0: 24 * GiB, 1: 24000 * MiB})
        self.assertEqual(parseGpuMemory("3=8G"), {3: 8 * GiB})

    def test_gpuMemoryRefused(self) -> None:
        """
        Anything else is refused with a message that says what works.
        """
        for text, message in [
            ("24GiB", "give INDEX=SIZE pairs"),
            ("a=24GiB", "give INDEX=SIZE pairs"),
            ("0=24", "GPU 0: '24' is not a size"),
            ("0=1G,0=2G", "GPU 0 is given twice"),
        ]:
            with self.subTest(text=text):
                self.assertIn(message, str(self.assertRaises(ValueError, parseGpuMemory, text)))

    def test_simulatedGpus(self) -> None:
        """
        C{--simulate-gpus} takes COUNTxSIZE, numbered from 0.
        """
        self.assertEqual(parseSimulatedGpus("2x24GiB"), {0: 24 * GiB, 1: 24 * GiB})
        for text in ("0x24GiB", "2x", "24GiB", "2x24"):
            with self.subTest(text=text):
                self.assertRaises(ValueError, parseSimulatedGpus, text)

    def test_childEnvironment(self) -> None:
        """
        A child named GPUs sees only those, in nvidia-smi's (PCI bus) order; one named none sees
        every GPU, as before.
        """
        self.assertEqual(childEnvironment([1, 0]), {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1,0"})
        self.assertEqual(childEnvironment([]), {})

    def test_chooseProbe(self) -> None:
        """
        Given sizes win; with --simulate and none given there are no GPUs; else nvidia-smi when
        it is on the PATH, and no GPUs when it is not.
        """
        reactor = cast(IReactorProcess, FakeProcessReactor())
        sizes = {0: GiB}
        self.assertEqual(chooseProbe(sizes, None, False, reactor, {}), FixedGpus(sizes))
        self.assertEqual(chooseProbe(None, sizes, True, reactor, {}), FixedGpus(sizes))
        self.assertIsNone(chooseProbe(None, None, True, reactor, {"PATH": str(FAKE_NVIDIA_SMI_DIRECTORY)}))
        probe = chooseProbe(None, None, False, reactor, {"PATH": str(FAKE_NVIDIA_SMI_DIRECTORY)})
        assert isinstance(probe, NvidiaSmi)
        self.assertEqual(probe.executable, str(FAKE_NVIDIA_SMI_DIRECTORY / "nvidia-smi"))
        self.assertIsNone(chooseProbe(None, None, False, reactor, {"PATH": self.mktemp()}))
