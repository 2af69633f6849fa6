"""
A smoke run of the benchmark (bench/run.py --quick): every scenario runs end to end against the
real proxy and simulator (and nginx, where it is installed), and the table comes out.  Nothing is
timed here; the figures belong in the benchmark's own output.  Skipped where the load generators
are not installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support.simulator import REPO_ROOT

TOOLS = ("wrk", "curl")


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
        request noted, and nginx's figures where nginx is installed (a note saying why not where
        it is not).
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
        if not nginxInstalled():
            self.assertIn("nginx was not measured: nginx is not installed", table)
        else:
            self.assertNotIn("nginx was not measured", table)
            self.assertIn("contenders: direct, nginx, proxy", table)
        self.assertNotIn("failed", table)
        self.assertNotIn("errors", table)
