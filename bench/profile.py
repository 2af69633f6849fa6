#!/usr/bin/env python3
"""
Where the proxy's CPU goes under one benchmark load: the proxy (and its simulator child) started
as bench/run.py starts them, a C{wrk} load of one named scenario, and C{py-spy record} attached
to the proxy's process for the middle of that load.  Prints the frames with the most self time
(the innermost frame of each sample) and the most total time (any frame of the sample), as
shares of the samples in which the proxy was running.

    python bench/profile.py                      # scenario b (small chats), c=16, 10 s
    python bench/profile.py --scenario a --native --output profile.txt

C{--native} also samples C code (the garbage collector shows up as C{gc_collect_main}), at some
cost to the proxy's speed; without it the time of a collection is charged to the Python line that
triggered it.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from run import CHAT, FAST, OLLAMA_CHAT, PROFILES, Servers, chatBody, ollamaBody

# The loads a profile can be taken under: path, body, and wrk's connections.
SCENARIOS = {
    "a": (CHAT, chatBody(PROFILES["fast"], True, 256), 16),
    "b": (CHAT, chatBody(PROFILES["fast"], False, 16), 16),
    "c": (OLLAMA_CHAT, ollamaBody(PROFILES["fast"], True, 256), 16),
}


def frames(sample: str) -> list[str]:
    """
    The frames of one line of py-spy's raw output (C{outer;...;inner COUNT}), outermost first.
    """
    return sample.split(";")


def readRaw(text: str) -> tuple[Counter[str], Counter[str], int]:
    """
    Self and total sample counts by frame, and the number of samples, from py-spy's raw format.
    """
    selfCounts: Counter[str] = Counter()
    totalCounts: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        found = frames(stack)
        samples += int(count)
        selfCounts[found[-1]] += int(count)
        for frame in set(found):
            totalCounts[frame] += int(count)
    return selfCounts, totalCounts, samples


def render(counts: Counter[str], samples: int, top: int) -> str:
    return "\n".join(f"{100 * count / max(samples, 1):6.1f}%  {frame}" for frame, count in counts.most_common(top))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="b", choices=sorted(SCENARIOS), help="the load [b]")
    parser.add_argument("--connections", type=int, help="wrk's connections [the scenario's: 16]")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long py-spy samples [10]")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second [250]")
    parser.add_argument("--top", type=int, default=25, help="frames to show in each list [25]")
    parser.add_argument("--native", action="store_true", help="also sample C frames (py-spy --native)")
    parser.add_argument("--output", help="keep py-spy's raw output in this file")
    options = parser.parse_args(argv)
    # py-spy is a pip package: look next to this interpreter too.
    searched = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    pySpy, wrk = shutil.which("py-spy", path=searched), shutil.which("wrk")
    if pySpy is None or wrk is None:
        print("profile: needs wrk and py-spy (apt-get install -y wrk; pip install py-spy)", file=sys.stderr)
        return 2
    path, body, connections = SCENARIOS[options.scenario]
    connections = options.connections or connections
    root = Path(tempfile.mkdtemp(prefix="tabbyproxy-bench-profile-"))
    servers = Servers(root)
    raw = Path(options.output) if options.output else root / "profile.txt"
    load: subprocess.Popen[str] | None = None
    try:
        servers.startProxy({PROFILES["fast"]: FAST})
        servers.use(PROFILES["fast"])
        script = root / "wrk-post.lua"
        script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                          f"wrk.body = [==[{json.dumps(body)}]==]\n")
        # wrk runs a little longer than py-spy on both sides, so every sample is under load.
        load = subprocess.Popen([wrk, "-t1", f"-c{connections}", f"-d{options.seconds + 3:g}s", "-s", str(script),
                                 f"http://127.0.0.1:{servers.proxyPort}{path}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.5)
        spy = [pySpy, "record", "-p", str(servers.proxyPid), "-d", f"{options.seconds:g}", "-r", str(options.rate),
               "-f", "raw", "--nolineno", "-o", str(raw)]
        if options.native:
            spy.append("--native")
        subprocess.run(spy, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wrkOutput = load.communicate()[0]
        selfCounts, totalCounts, samples = readRaw(raw.read_text())
    finally:
        if load is not None and load.poll() is None:
            load.terminate()
            load.wait()
        servers.stop()
        shutil.rmtree(root, ignore_errors=True)
    requestsLine = next((line.strip() for line in wrkOutput.splitlines() if line.startswith("Requests/sec")), "")
    print(f"scenario {options.scenario}: POST {path}, wrk c={connections}; {requestsLine}; "
          f"{samples} samples at {options.rate}/s over {options.seconds:g} s "
          f"({100 * samples / (options.rate * options.seconds):.0f}% of them with the proxy running)")
    print("\nself time (innermost frame):")
    print(render(selfCounts, samples, options.top))
    print("\ntotal time (any frame of the sample):")
    print(render(totalCounts, samples, options.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
