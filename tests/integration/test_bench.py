"""
A smoke run of the benchmark (bench/run.py --quick): every scenario runs end to end against the
real proxy and simulator (and nginx, where it is installed), and the table comes out.  Nothing is
timed here; the figures belong in the benchmark's own output.  Skipped where the load generators
are not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tabbyproxy.listener import processStats
from tests.support.simulator import REPO_ROOT

TOOLS = ("wrk", "curl")


def sessionMembers(session: int) -> list[int]:
    """
    The live processes of a session, read from /proc (fields 3 and 6 of each process's stat);
    a zombie has exited, only its parent has not reaped it yet.
    """
    return [pid for pid, fields in processStats() if fields[0] != "Z" and int(fields[3]) == session]


def nginxInstalled() -> bool:
    """
    Whether the benchmark will find nginx (where bench/run.py looks: the PATH, then sbin).
    """
    return shutil.which("nginx") is not None or any(
        Path(folder, "nginx").exists() for folder in ("/usr/sbin", "/usr/local/sbin"))


class BenchSmokeTests(SynchronousTestCase):
    def setUp(self) -> None:
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            raise SkipTest(f"{', '.join(missing)} not installed (apt-get install -y wrk curl)")

    def test_quickRun(self) -> None:
        """
        C{bench/run.py --quick} exits 0 and prints a row for each scenario, with no failed
        request noted, Twisted's relay's figures, and nginx's where nginx is installed (a note
        saying why not where it is not).
        """
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--quick"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        table = result.stdout
        for scenario in ("a stream 256", "b small", "c messages", "c responses", "d cold start", "e memory",
                         "r realistic"):
            self.assertIn(f"| {scenario}", table)
        self.assertIn("targets:", table)
        self.assertIn("| proxy vs nginx", table)
        rows = [[cell.strip() for cell in line.split("|")] for line in table.splitlines() if line.startswith("| ")]
        twisted = rows[0].index("twisted")
        streamed = [row[twisted] for row in rows if row[1] == "a stream 256" and row[3] == "chunks/s"]
        self.assertTrue(streamed and float(streamed[0].replace(",", "")) > 0, streamed)
        if not nginxInstalled():
            self.assertIn("nginx was not measured: nginx is not installed", table)
        else:
            self.assertNotIn("nginx was not measured", table)
            self.assertIn("contenders: direct, nginx, twisted, proxy", table)
        self.assertNotIn("failed", table)
        self.assertNotIn("errors", table)

    def test_sigtermStopsEverything(self) -> None:
        """
        SIGTERM in the middle of a run ends it with status 143 after stopping every process it
        started (the simulators, nginx, the proxy and the proxy's child) and removing its
        directory.
        """
        if not Path("/proc/self/stat").exists():
            raise SkipTest("needs /proc to find the run's processes")
        root = ""
        bench = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "bench" / "run.py"), "--quick", "--only", "b"],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )

        def killLeftovers() -> None:
            for pid in sessionMembers(bench.pid):
                os.kill(pid, signal.SIGKILL)
            bench.wait()
            if root:
                shutil.rmtree(root, ignore_errors=True)

        self.addCleanup(killLeftovers)
        assert bench.stderr is not None
        with bench.stderr:
            for line in bench.stderr:
                if line.startswith("bench: starting"):
                    root = line.rsplit(" in ", 1)[1].strip()
                if line.startswith("bench: round 1"):
                    break
            self.assertTrue(root)
            bench.send_signal(signal.SIGTERM)
            # Read on until it exits: it reports figures as it goes, and a closed pipe would
            # end it with an error of its own instead of the signal's.
            bench.stderr.read()
        self.assertEqual(bench.wait(120), 128 + signal.SIGTERM)
        self.assertEqual(sessionMembers(bench.pid), [])
        self.assertFalse(Path(root).exists())
