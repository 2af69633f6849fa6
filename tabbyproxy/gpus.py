"""
What the proxy knows of the GPUs: a probe that reads their capacity and use, either from
C{nvidia-smi} (run asynchronously, its CSV parsed) or from fixed figures given as an option
(C{--gpu-memory 0=24GiB,1=24GiB}, or the simulator's C{--simulate-gpus 2x24GiB}), and the
environment that gives a child its GPUs.

Indices are C{nvidia-smi}'s, which follow the PCI bus; CUDA numbers devices fastest first
unless told otherwise, so a child gets C{CUDA_DEVICE_ORDER=PCI_BUS_ID} beside its
C{CUDA_VISIBLE_DEVICES}, or a profile's C{gpus: [1]} could land on another card.
"""

from __future__ import annotations

import re
import shutil
from typing import Mapping, Protocol, Sequence

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from tabbyproxy.sizes import MiB, SizeError, parseSize


class GpuProbeError(Exception):
    """
    The GPUs could not be read: C{nvidia-smi} failed or said something the proxy cannot parse;
    the message says which, with the line.
    """


@frozen
class Gpu:
    """
    One GPU: its C{nvidia-smi} index, and its memory in bytes, in all and in use by anyone.
    """

    index: int
    total: int
    used: int


@frozen
class GpuProcess:
    """
    The memory one process uses on one GPU (a process on two GPUs has two).
    """

    pid: int
    gpu: int
    used: int


@frozen
class GpuReading:
    """
    The GPUs at one moment.

    @ivar measured: whether the figures were measured (C{nvidia-smi}) or given (an option);
        given figures know no use and no processes.
    """

    gpus: tuple[Gpu, ...]
    processes: tuple[GpuProcess, ...] = ()
    measured: bool = False

    def usedBy(self, pid: int) -> dict[int, int]:
        """
        The bytes process C{pid} uses on each GPU it uses, by index.
        """
        used: dict[int, int] = {}
        for process in self.processes:
            if process.pid == pid:
                used[process.gpu] = used.get(process.gpu, 0) + process.used
        return used

    def capacity(self, ownPids: Sequence[int] = ()) -> dict[int, int]:
        """
        The bytes the proxy's children may use on each GPU: its total, less what processes other
        than C{ownPids} (the children) use on it.
        """
        capacity = {}
        for gpu in self.gpus:
            own = sum(p.used for p in self.processes if p.gpu == gpu.index and p.pid in ownPids)
            others = max(0, gpu.used - own) if self.measured else 0
            capacity[gpu.index] = gpu.total - others
        return capacity


class GpuProbe(Protocol):
    """
    Reads the GPUs, for the scheduler (capacity) and C{/status} (measured use).
    """

    def read(self) -> Deferred[GpuReading]:
        """
        The GPUs now; fails with L{GpuProbeError}.
        """


GPU_QUERY = ("--query-gpu=index,uuid,memory.total,memory.used", "--format=csv,noheader,nounits")
"""C{nvidia-smi}'s arguments for the GPUs; C{uuid} ties the processes' lines to an index."""

PROCESS_QUERY = ("--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits")
"""C{nvidia-smi}'s arguments for the processes on the GPUs, one line per process and GPU."""


def _fields(line: str, count: int, what: str) -> list[str]:
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != count:
        raise GpuProbeError(f"nvidia-smi {what}: expected {count} fields, got {line!r}")
    return fields


def _mebibytes(text: str, line: str, what: str) -> int:
    if not text.isdigit():
        raise GpuProbeError(f"nvidia-smi {what}: {text!r} is not a number of MiB in {line!r}")
    return int(text) * MiB


def parseGpuLines(output: str) -> tuple[tuple[Gpu, ...], dict[str, int]]:
    """
    The GPUs in the output of C{nvidia-smi} with L{GPU_QUERY}, and each one's index by UUID.

    @raise GpuProbeError: for a line that is not index, UUID, total and used MiB, or no GPU.
    """
    gpus = []
    indices = {}
    for line in output.splitlines():
        if not line.strip():
            continue
        index, uuid, total, used = _fields(line, 4, "--query-gpu")
        if not index.isdigit():
            raise GpuProbeError(f"nvidia-smi --query-gpu: {index!r} is not a GPU index in {line!r}")
        gpus.append(Gpu(int(index), _mebibytes(total, line, "--query-gpu"), _mebibytes(used, line, "--query-gpu")))
        indices[uuid] = int(index)
    if not gpus:
        raise GpuProbeError("nvidia-smi --query-gpu: it listed no GPU")
    return tuple(gpus), indices


def parseProcessLines(output: str, indices: Mapping[str, int]) -> tuple[GpuProcess, ...]:
    """
    The processes in the output of C{nvidia-smi} with L{PROCESS_QUERY}.  A process whose memory
    the driver does not report (C{[N/A]}, as in some containers) is left out.

    @param indices: each GPU's index by UUID, from L{parseGpuLines}.
    @raise GpuProbeError: for a line that is not a pid, a known GPU's UUID and MiB.
    """
    processes = []
    for line in output.splitlines():
        if not line.strip():
            continue
        pid, uuid, used = _fields(line, 3, "--query-compute-apps")
        if used == "[N/A]":
            continue
        if not pid.isdigit() or uuid not in indices:
            raise GpuProbeError(f"nvidia-smi --query-compute-apps: expected a pid and a GPU's UUID in {line!r}")
        processes.append(GpuProcess(int(pid), indices[uuid], _mebibytes(used, line, "--query-compute-apps")))
    return tuple(processes)


@frozen
class NvidiaSmi:
    """
    The GPUs as C{nvidia-smi} reports them, run through the injected process reactor.
    """

    executable: str
    reactor: IReactorProcess
    environ: Mapping[str, str]

    @classmethod
    def find(cls, reactor: IReactorProcess, environ: Mapping[str, str]) -> NvidiaSmi | None:
        """
        The probe for the C{nvidia-smi} on C{environ}'s C{PATH}, or C{None} when there is none.
        """
        executable = shutil.which("nvidia-smi", path=environ.get("PATH"))
        return None if executable is None else cls(executable, reactor, environ)

    def read(self) -> Deferred[GpuReading]:
        return Deferred.fromCoroutine(self._read())

    async def _read(self) -> GpuReading:
        gpus, indices = parseGpuLines(await self._run(GPU_QUERY))
        processes = parseProcessLines(await self._run(PROCESS_QUERY), indices)
        return GpuReading(gpus, processes, measured=True)

    async def _run(self, arguments: tuple[str, ...]) -> str:
        ended: Deferred[tuple[bytes, bytes, int | None, int | None]] = Deferred()
        self.reactor.spawnProcess(
            _Output(ended), self.executable, [self.executable, *arguments], env=dict(self.environ)
        )
        out, err, code, signal = await ended
        if code != 0:
            said = (err or out).decode("utf-8", "replace").strip().splitlines()
            how = f"exit status {code}" if signal is None else f"signal {signal}"
            raise GpuProbeError(f"{self.executable} {arguments[0]}: {how}: {said[-1] if said else 'no output'}")
        return out.decode("utf-8", "replace")


class _Output(ProcessProtocol):
    """
    Collects a short-lived process's output and how it ended.  (Twisted's
    C{getProcessOutputAndValue} fails with a tuple, which cannot be raised, when a signal ends
    the process.)
    """

    def __init__(self, ended: Deferred[tuple[bytes, bytes, int | None, int | None]]) -> None:
        self.ended = ended
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback((b"".join(self.out), b"".join(self.err), reason.value.exitCode, reason.value.signal))


@frozen
class FixedGpus:
    """
    GPUs of given sizes, for a machine whose C{nvidia-smi} the proxy cannot run, and for the
    simulator: capacity only, no measured use.
    """

    capacities: Mapping[int, int]

    def read(self) -> Deferred[GpuReading]:
        gpus = tuple(Gpu(index, total, 0) for index, total in sorted(self.capacities.items()))
        return succeed(GpuReading(gpus))


def parseGpuMemory(text: str) -> dict[int, int]:
    """
    The value of C{--gpu-memory}: C{INDEX=SIZE} pairs separated by commas (C{0=24GiB,1=24GiB}).

    @raise ValueError: with a message that says what was wrong and what works.
    """
    capacities: dict[int, int] = {}
    for part in text.split(","):
        index, equals, size = part.strip().partition("=")
        if not (equals and index.strip().isdigit()):
            raise ValueError(f"--gpu-memory {text!r}: give INDEX=SIZE pairs separated by commas, such as 0=24GiB,1=24GiB")
        if int(index) in capacities:
            raise ValueError(f"--gpu-memory {text!r}: GPU {int(index)} is given twice")
        try:
            capacities[int(index)] = parseSize(size)
        except SizeError as e:
            raise ValueError(f"--gpu-memory {text!r}: GPU {int(index)}: {e}") from None
    return capacities


_SIMULATED = re.compile(r"\s*(\d+)\s*x\s*(.+)")


def parseSimulatedGpus(text: str) -> dict[int, int]:
    """
    The value of C{--simulate-gpus}: C{COUNTxSIZE} (C{2x24GiB}), GPUs numbered from 0.

    @raise ValueError: with a message that says what was wrong and what works.
    """
    match = _SIMULATED.fullmatch(text)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"--simulate-gpus {text!r}: give a count and a size, such as 2x24GiB")
    try:
        size = parseSize(match.group(2))
    except SizeError as e:
        raise ValueError(f"--simulate-gpus {text!r}: {e}") from None
    return {index: size for index in range(int(match.group(1)))}


def childEnvironment(gpus: Sequence[int]) -> dict[str, str]:
    """
    The variables that give a child C{gpus} (C{nvidia-smi} indices) and no others; nothing when
    C{gpus} is empty, so a child with no GPUs named sees them all, as before.
    """
    if not gpus:
        return {}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(gpu) for gpu in gpus)}


def chooseProbe(
    gpuMemory: Mapping[int, int] | None, simulatedGpus: Mapping[int, int] | None, simulate: bool,
    reactor: IReactorProcess, environ: Mapping[str, str],
) -> GpuProbe | None:
    """
    The probe the options ask for: the sizes of C{--gpu-memory} or C{--simulate-gpus}, else
    C{nvidia-smi} when it is on the C{PATH} (never with C{--simulate}: the simulator's children use
    no GPU), else C{None}: no GPU memory is known, and only the count cap places models.
    """
    if gpuMemory is not None:
        return FixedGpus(gpuMemory)
    if simulatedGpus is not None:
        return FixedGpus(simulatedGpus)
    if simulate:
        return None
    return NvidiaSmi.find(reactor, environ)
