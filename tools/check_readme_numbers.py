#!/usr/bin/env python3
"""Checks that the numbers of README tables and paragraphs come from the results files they cite.

The convention. An HTML comment at the start of a line (it may span lines)

    <!-- numbers: results/quick-evaluation.csv results/quick-*.json -->

cites one or more committed files (paths relative to the markdown file, shell globs allowed) for
the block that follows it: the next table, or the next paragraph (the lines up to a blank
line), blank lines between the comment and the block allowed. The comment does not render; say
where the numbers come from in the visible text too (a link or a path beside the table).
Numbers of the block that describe the setting rather than a result (a network size, a
paper's figure) go after `except:`, as written in the text:

    <!-- numbers: results/paper-plastic-seed0.csv except: 1000 5 3e-4 -->

Cite the smallest files that hold a block's numbers (the evaluation, not the training log): any
value of a cited file can match, and a long log holds many values.

Every number of the block not listed after `except:` must be found in the cited files, within
the rounding it is shown with (46.5% matches 0.4647; 0.057 matches 0.0571), through its unit:

    42, 0.057, 1,000, 3e-4   the value itself
    46.5%                    a fraction × 100
    12 ms                    seconds × 1000
    33 s, 64 min, 2 h        seconds, seconds / 60, seconds / 3600
    1 min 53 s               113 seconds

Not checked: a table's header row and its first column (the row's label), inline code
(`--iterations 1000`), link targets, HTML comments, numbers glued to letters or to a path
(16x16, seed0, paper-1200, 4.4M), and citations inside fenced code blocks. A range shows its
unit on both ends (1%-2%): the first end of 1-2% is read without one. A number sits in a file
as a CSV cell, a JSON number (at any depth, the manifest's wall time included), or any number
in the text of another kind of file (a log).

Usage: python tools/check_readme_numbers.py [FILE.md ...]; without arguments, every markdown
file of the repository that git tracks. Prints each number not found (file, line, the number,
the nearest value), and exits with 1 if there is one, or if a citation names no file or
precedes no block; 0 otherwise.
"""

import argparse
import csv
import glob
import json
import math
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

MARKER_START = re.compile(r"^\s*<!--\s*numbers:")
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
UNIT = re.compile(r"\s*(%|ms|min|minutes?|h|hours?|s|seconds?)(?![\w])")
MINUTES_SECONDS = re.compile(r"(?<![\w.])(\d+) min (\d+) s(?![\w])")
NOT_TEXT = re.compile(r"<!--.*?-->|`[^`]*`|\]\([^)]*\)|<https?://[^>]*>")
# value in a file -> the quantity shown with this unit
SCALES = {
    "%": (100.0,),
    "ms": (1000.0,),
    "min": (1 / 60,),
    "h": (1 / 3600,),
    "s": (1.0,),
    None: (1.0,),
}
UNIT_NAMES = {
    "minute": "min",
    "minutes": "min",
    "hour": "h",
    "hours": "h",
    "second": "s",
    "seconds": "s",
}


class Shown:
    """A number as the text shows it: its value, the unit it is read with, its rounding."""

    def __init__(self, text, value, unit, tolerance):
        self.text, self.value, self.unit, self.tolerance = text, value, unit, tolerance

    def matches(self, candidate):
        return abs(candidate - self.value) <= self.tolerance * (1 + 1e-9) + 1e-12


def half_last_digit(text):
    """Half a unit of the last digit shown: the rounding of a number written as `text`."""
    return 0.5 * 10.0 ** Decimal(text.replace(",", "").lstrip("-")).as_tuple().exponent


def is_name(text, start, end):
    """Whether the number at text[start:end] is part of a word or a path (seed0, x16, a-12)."""
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    if after.isalnum() or after == "_" or (after == "." and text[end + 1 : end + 2].isalnum()):
        return not UNIT.match(text, end)
    if text[start] == "-":  # a minus sign or a range's dash (1-2%), unless after a word (a-12)
        return before.isalpha() or before in "_./"
    return before.isalnum() or before in "_./"


def numbers_in(text, exempt):
    """The checked numbers of one line of text (see the module's docstring)."""
    text = NOT_TEXT.sub(" ", text)
    found = []
    for m in MINUTES_SECONDS.finditer(text):
        found.append(Shown(m.group(0), 60 * int(m.group(1)) + int(m.group(2)), "s", 0.5))
    text = MINUTES_SECONDS.sub(" ", text)
    for m in NUMBER.finditer(text):
        if is_name(text, m.start(), m.end()):
            continue
        number = m.group(0)
        if number.startswith("-") and m.start() and text[m.start() - 1].isdigit():
            number = number[1:]  # the second end of a range, 1-2%
        unit_match = UNIT.match(text, m.end())
        unit = unit_match.group(1) if unit_match else None
        unit = UNIT_NAMES.get(unit, unit)
        written = number + ("%" if unit == "%" else "")
        if number in exempt or written in exempt:
            continue
        found.append(
            Shown(
                written if unit == "%" else number + (f" {unit}" if unit else ""),
                float(number.replace(",", "")),
                unit,
                half_last_digit(number),
            )
        )
    return found


def table_cells(row):
    """The cells of a markdown table row but its first (the row's label)."""
    cells = re.split(r"(?<!\\)\|", row.strip().strip("|"))
    return cells[1:]


def blocks(lines):
    """(line number of the citation, its text, [(line number, text to check)]) for each
    citation; the list is empty when no block follows it."""
    fenced, i = False, 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not MARKER_START.match(lines[i]):
            i += 1
            continue
        start, body = i, lines[i].split("numbers:", 1)[1]
        while "-->" not in body and i + 1 < len(lines):  # a citation may span lines
            i += 1
            body += " " + lines[i]
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block = []
        if j < len(lines) and lines[j].lstrip().startswith("|"):
            k = j
            while k < len(lines) and lines[k].lstrip().startswith("|"):
                k += 1
            block = [(n + 1, " | ".join(table_cells(lines[n]))) for n in range(j + 2, k)]
        else:
            while j < len(lines) and lines[j].strip() and not MARKER_START.match(lines[j]):
                block.append((j + 1, lines[j]))
                j += 1
        yield start + 1, body.split("-->", 1)[0], block
        i += 1


def file_values(path):
    """Every number of a results file: CSV cells, JSON numbers, or the numbers of its text."""
    text = path.read_text(errors="replace")
    if path.suffix == ".json":
        values, pending = [], [json.loads(text)]
        while pending:
            item = pending.pop()
            if isinstance(item, dict):
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)
            elif isinstance(item, (int, float)) and not isinstance(item, bool):
                values.append(float(item))
        return values
    if path.suffix == ".csv":
        cells = (cell for row in csv.reader(text.splitlines()) for cell in row)
    else:
        cells = (m.group(0).replace(",", "") for m in NUMBER.finditer(text))
    values = []
    for cell in cells:
        try:
            values.append(float(cell))
        except ValueError:
            pass
    return [v for v in values if math.isfinite(v)]


def check_file(markdown):
    """(numbers checked, [problem messages]) for one markdown file."""
    lines = Path(markdown).read_text().splitlines()
    checked, problems = 0, []
    for marker_line, body, block in blocks(lines):
        where = f"{markdown}:{marker_line}"
        cited, _, exempt = body.partition("except:")
        patterns, exempt = cited.split(), set(exempt.split())
        paths = sorted(
            {
                Path(p)
                for pattern in patterns
                for p in glob.glob(str(Path(markdown).parent / pattern))
            }
        )
        missing = [p for p in patterns if not glob.glob(str(Path(markdown).parent / p))]
        if not patterns or missing:
            problems.append(f"{where}: cited file not found: {' '.join(missing) or '(none)'}")
            continue
        if not block:
            problems.append(f"{where}: no table or paragraph follows the citation")
            continue
        values = [v for path in paths for v in file_values(path)]
        names = ", ".join(patterns)
        for line_number, text in block:
            for shown in numbers_in(text, exempt):
                checked += 1
                candidates = [v * scale for v in values for scale in SCALES[shown.unit]]
                if not any(shown.matches(c) for c in candidates):
                    nearest = min(candidates, key=lambda c: abs(c - shown.value), default=None)
                    problems.append(
                        f"{markdown}:{line_number}: {shown.text} is not in {names} within "
                        f"±{shown.tolerance:g}"
                        + (f" (nearest {nearest:.6g})" if nearest is not None else "")
                    )
    return checked, problems


def tracked_markdown():
    root = Path(__file__).resolve().parent.parent
    listed = subprocess.run(
        ["git", "ls-files", "*.md"], cwd=root, capture_output=True, text=True
    ).stdout.split()
    return [str(root / name) for name in listed]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="markdown files (default: every tracked one)")
    files = parser.parse_args(argv).files or tracked_markdown()
    total, problems = 0, []
    for markdown in files:
        checked, found = check_file(markdown)
        total, problems = total + checked, problems + found
    for problem in problems:
        print(problem)
    print(
        f"{total} numbers checked in {len(files)} files: "
        f"{len(problems) or 'no'} problem{'' if len(problems) == 1 else 's'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
