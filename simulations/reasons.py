"""Failure reasons made safe to print: one line, no terminal escapes, bounded length.

A reason may come from a client across the wire; the round lines and the report show
it only after this cleaning.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"(\x1b|\?)\[[0-9;]*[A-Za-z]")
REPORT_REASON_CHARS = 300
LINE_REASON_CHARS = 120


def clean_reason(text: str, limit: int = REPORT_REASON_CHARS) -> str:
    """``text`` without ANSI codes or traceback lines, on one line, at most ``limit`` chars."""
    text = _ANSI.sub("", str(text))
    if "Traceback" in text:
        # Keep the exception line, not the stack.
        tail = re.findall(r"([A-Za-z_.]*(?:Error|Exception)\b[^?\n]*)", text)
        text = tail[-1] if tail else text.split("Traceback", 1)[0] or "client failure"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
