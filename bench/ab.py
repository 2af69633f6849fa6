#!/usr/bin/env python3
"""
One optimisation's before and after, from one run: bench/run.py's scenarios against proxies
started from several source trees (C{main}, or any git ref, exported with C{git archive}; C{.}
for the working tree), in interleaved rounds, each tree's round beside its own direct run.
Prints each tree's proxy figures with their ratio to direct, and each tree's ratio to the first.

    python bench/ab.py --only b                      # main against the working tree
    python bench/ab.py --only ab --rounds 5 main HEAD~1 .

The machine's noise moves direct and proxied figures together: compare the ratios to direct
(and to each other), not the absolute figures.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from run import (CONTENDERS, FAST, PROFILES, REPO, SLOW, Report, Round, Servers, Settings, agentAPIs, memory,
                 ollama, realistic, small, streaming)

SCENARIOS = "abcer"


def exportTree(ref: str, root: Path) -> Path:
    """
    The source tree C{ref} names: the working tree for C{.}, else the commit exported into C{root}.
    """
    if ref == ".":
        return REPO
    tree = root / f"tree-{len(list(root.glob('tree-*')))}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def compare(refs: Sequence[str], reports: dict[str, Report]) -> str:
    """
    One row per proxy figure: each tree's median, its ratio to direct, and its ratio to the first tree's.
    """
    header = ["scenario", "load", "metric"]
    for index, ref in enumerate(refs):
        header += [f"{ref} proxy", f"{ref} vs direct"] + ([f"{ref} / {refs[0]}"] if index else [])
    rows = [header]
    first = reports[refs[0]]
    for key, figure in first.figures.items():
        if "proxy" not in figure.medians():
            continue
        row = list(key)
        base = figure.medians()["proxy"]
        for index, ref in enumerate(refs):
            other = reports[ref].figures.get(key)
            medians = other.medians() if other else {}
            proxy = medians.get("proxy")
            row += [figure.fmt.format(proxy) if proxy is not None else "-",
                    other.compared("direct") if other else "-"]
            if index:
                row.append(f"x{proxy / base:.3f}" if proxy is not None and base else "-")
        rows.append(row)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("refs", nargs="*", default=["main", "."],
                        help="git refs of the trees, the first the base; . is the working tree [main .]")
    parser.add_argument("--only", default="b", help=f"scenarios, of {SCENARIOS} [b]")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds [3]")
    parser.add_argument("--seconds", type=float, help="duration of each wrk run [3]")
    parser.add_argument("--quick", action="store_true", help="tiny loads, as bench/run.py --quick")
    parser.add_argument("--nginx", action="store_true", help="measure nginx too, in each tree's round")
    parser.add_argument("--twisted", action="store_true", help="measure Twisted's own relay too, in each tree's round")
    options = parser.parse_args(argv)
    if len(set(options.refs)) < 2 or set(options.only) - set(SCENARIOS):
        parser.error(f"needs two trees or more and scenarios of {SCENARIOS}")
    settings = Settings.make(options.quick, options.seconds, options.rounds)
    root = Path(tempfile.mkdtemp(prefix="tabbyproxy-bench-ab-"))
    servers = Servers(root)
    reports = {ref: Report(settings.rounds) for ref in options.refs}
    # The reference relays run only when asked for (--nginx, --twisted).
    contenders = [name for name in CONTENDERS if name not in ("nginx", "twisted") or getattr(options, name)]
    proxies: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    try:
        servers.startDirect("fast", FAST)
        servers.startDirect("slow", SLOW)
        servers.startDirect("hold", settings.holdKnobs)
        if options.nginx and servers.startNginx() is not None:
            contenders.remove("nginx")
        if options.twisted:
            servers.startTwisted()
        for index, ref in enumerate(options.refs):
            profiles = {PROFILES["fast"]: FAST, PROFILES["slow"]: SLOW, PROFILES["hold"]: settings.holdKnobs}
            port = servers.startProxy(profiles, repo=exportTree(ref, root), name=f"proxy-{index}")
            assert servers.proxy is not None
            proxies[ref] = (port, servers.proxy)
            servers.use(PROFILES["fast"])
        perAnswer: dict[str, dict[str, int]] = {ref: {} for ref in options.refs}
        for number in range(settings.rounds):
            # Each round starts with the next tree, and each tree's turn with the next contender.
            shift = number % len(options.refs)
            for turn, ref in enumerate(options.refs[shift:] + options.refs[:shift]):
                servers.proxyPort, servers.proxy = proxies[ref]
                order = (number + turn) % len(contenders)
                run = Round(servers, reports[ref], settings, tuple(contenders[order:] + contenders[:order]),
                            number + 1)
                print(f"bench: round {number + 1} of {settings.rounds}: {ref}", file=sys.stderr)
                if "e" in options.only:
                    memory(run)
                openaiChunks: dict[int, float] = {}
                if "a" in options.only or "c" in options.only:
                    openaiChunks = streaming(run, perAnswer[ref])
                if "b" in options.only:
                    small(run)
                if "c" in options.only:
                    ollama(run, openaiChunks)
                    agentAPIs(run, openaiChunks)
                if "r" in options.only:
                    realistic(run, "not measured by ab.py")
    finally:
        servers.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"trees: {', '.join(options.refs)}; scenarios {options.only}; medians of {settings.rounds} "
          f"interleaved rounds, {settings.seconds:g} s wrk runs\n")
    print(compare(options.refs, reports))
    for ref in options.refs:
        for note in reports[ref].notes:
            print(f"- {ref}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
