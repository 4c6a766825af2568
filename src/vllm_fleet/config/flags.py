"""Engine flags as vLLM's parser reads them, in a deployment's `args` or an argv."""

from __future__ import annotations


def flag_name(arg: str) -> str:
    """The flag an argument sets, as vLLM reads it: `--a_b=1` is `--a-b` (vLLM's parser
    turns underscores in long flag names into dashes)."""
    name = arg.split("=", 1)[0]
    return name.replace("_", "-") if name.startswith("--") else name


def flag_value(args: list[str], *names: str) -> str | None:
    """The value of `--flag V` or `--flag=V` in an argument list (last one wins)."""
    found = None
    for index, arg in enumerate(args):
        if flag_name(arg) not in names:
            continue
        if "=" in arg:
            found = arg.split("=", 1)[1]
        elif index + 1 < len(args):
            found = args[index + 1]
    return found
