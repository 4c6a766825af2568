"""Problems found in a fleet file: each names its place (`deployments.qwen.gpus[1]`),
its line, and what to do."""

from __future__ import annotations

from dataclasses import dataclass

Loc = tuple[str | int, ...]


@dataclass
class ConfigIssue:
    """One problem in a fleet file: where it is and what to do."""

    loc: Loc
    message: str
    line: int | None = None

    def where(self) -> str:
        return format_loc(self.loc)


class ConfigError(Exception):
    """A fleet file that cannot be used; `issues` lists every problem found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.issues)} problem(s) in the fleet file"]
        for issue in self.issues:
            at = f"line {issue.line}, " if issue.line else ""
            place = issue.where() or "(top level)"
            lines.append(f"  {at}{place}: {issue.message}")
        return "\n".join(lines)


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
