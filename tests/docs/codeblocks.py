"""The Python code blocks of a Markdown page, as the doc tests run them.

A block is skipped only when the line right before its opening fence says why::

    <!-- doctest: skip (needs a TPU pod) -->
"""

import re
from pathlib import Path

FENCE = re.compile(r"^```python\s*$")
SKIP = re.compile(r"^<!-- doctest: skip \((?P<reason>[^)]+)\) -->$")


def python_blocks(page: Path) -> tuple[list[str], list[str]]:
    """``(blocks to run, reasons of the skipped ones)``, in page order."""
    lines = page.read_text().splitlines()
    blocks, skipped = [], []
    i = 0
    while i < len(lines):
        if not FENCE.match(lines[i]):
            i += 1
            continue
        end = lines.index("```", i + 1)
        skip = SKIP.match(lines[i - 1]) if i else None
        if skip:
            skipped.append(skip["reason"])
        else:
            blocks.append("\n".join(lines[i + 1 : end]))
        i = end + 1
    return blocks, skipped
