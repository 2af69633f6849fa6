"""
TabbyAPI's console: the log lines it prints (Rich-style levels), which are all the proxy ever
sees of its child through a pipe.
"""

from __future__ import annotations

import sys
from datetime import datetime


class Console:
    """
    TabbyAPI's console log, imitated on stdout.

    Lines look like ``2026-11-26 05:39:36.812 INFO:     message``.  They are not wrapped at 80
    columns the way Rich does on a pipe, because nothing gains from reproducing that; a consumer
    that copes with wrapped lines copes with unwrapped ones too.  Every line is flushed at once
    since stdout is a pipe and the scheduler reads it live.
    """

    def line(self, level: str, message: str) -> None:
        now = datetime.now()
        stamp = now.strftime("%Y-%m-%d %H:%M:%S") + f".{now.microsecond // 1000:03d}"
        text = f"{stamp} {level + ':':<9} {message}\n"
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            # The reader went away; the server keeps working without its console.
            pass

    def info(self, message: str) -> None:
        self.line("INFO", message)

    def warning(self, message: str) -> None:
        self.line("WARNING", message)

    def error(self, message: str) -> None:
        self.line("ERROR", message)


