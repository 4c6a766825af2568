"""What PyYAML's parsed data forgets: the line of every place, numbers as written, and
keys written twice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from vllm_fleet.config.problems import ConfigIssue, Loc


@dataclass
class Lines:
    by_loc: dict[Loc, int]


def line_index(node: yaml.Node | None) -> Lines:
    index: dict[Loc, int] = {}

    def walk(n: yaml.Node, loc: Loc) -> None:
        index[loc] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (*loc, str(key_node.value))
                walk(value_node, key)
                index[key] = key_node.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*loc, i))

    if node is not None:
        walk(node, ())
    return Lines(index)


def number_texts(node: yaml.Node | None, loc: Loc = ()) -> dict[Loc, str]:
    """The source text of every plain number in the file, by place."""
    out: dict[Loc, str] = {}
    if isinstance(node, yaml.ScalarNode):
        if node.style is None and node.tag.endswith((":int", ":float")):
            out[loc] = str(node.value)
    elif isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            out.update(number_texts(value_node, (*loc, str(key_node.value))))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out.update(number_texts(item, (*loc, index)))
    return out


def as_written(data: Any, texts: dict[Loc, str], loc: Loc = ()) -> Any:
    """Numbers in engine args, env values and commands become the text as written: YAML
    reads `1.10` as 1.1 and `010` as 8, and the engine must get what the file says."""
    if isinstance(data, dict):
        return {k: as_written(v, texts, (*loc, str(k))) for k, v in data.items()}
    if isinstance(data, list):
        return [as_written(v, texts, (*loc, i)) for i, v in enumerate(data)]
    text_only = loc[:1] == ("engine_command",) or (
        len(loc) > 3 and loc[0] == "deployments" and loc[2] in ("args", "env", "command")
    )
    if text_only and isinstance(data, int | float) and not isinstance(data, bool):
        return texts.get(loc, data)
    return data


def duplicate_keys(node: yaml.Node | None, loc: Loc = ()) -> list[ConfigIssue]:
    """A key written twice in one mapping: YAML silently keeps the last, so say so."""
    issues: list[ConfigIssue] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in first and key != "<<":
                issues.append(
                    ConfigIssue(
                        loc=(*loc, key),
                        message=f"`{key}` is written twice (lines {first[key]} and {line}); "
                        "YAML would silently keep only the last one; remove or rename one",
                        line=line,
                    )
                )
            first.setdefault(key, line)
            issues.extend(duplicate_keys(value_node, (*loc, key)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            issues.extend(duplicate_keys(item, (*loc, index)))
    return issues


def nearest_line(lines: Lines, loc: Loc) -> int | None:
    for end in range(len(loc), 0, -1):
        line = lines.by_loc.get(loc[:end])
        if line is not None:
            return line
    return None
