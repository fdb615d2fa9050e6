"""Markdown tables for the bench scripts' output, so that REPORT.md renders them the same way."""
from __future__ import annotations


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
