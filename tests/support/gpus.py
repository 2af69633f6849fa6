"""
GPU test doubles: a probe whose reading the test sets, and the fake C{nvidia-smi} on a
C{PATH} for the integration tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed

from tabbyproxy.gpus import GpuProbeError, GpuReading

FAKE_NVIDIA_SMI_DIRECTORY = Path(__file__).parent / "bin"
"""The folder holding the fake C{nvidia-smi}: put it first on a child's C{PATH}."""


@define
class FakeGpuProbe:
    """
    A probe that answers the reading the test sets, or fails with C{error} when that is set.

    @ivar reads: how many times it was read.
    """

    reading: GpuReading
    error: str | None = None
    reads: int = field(default=0, init=False)

    def read(self) -> Deferred[GpuReading]:
        self.reads += 1
        if self.error is not None:
            return fail(GpuProbeError(self.error))
        return succeed(self.reading)


def fakeNvidiaSmiEnvironment(answers: Path, reply: Mapping[str, object]) -> dict[str, str]:
    """
    Write the fake C{nvidia-smi}'s C{reply} to C{answers}, and return an environment whose
    C{PATH} finds it first and that names the file.
    """
    answers.write_text(json.dumps(reply), encoding="utf-8")
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(FAKE_NVIDIA_SMI_DIRECTORY), os.environ.get("PATH", "")]),
        "TABBYPROXY_FAKE_NVIDIA_SMI": str(answers),
    }
