"""Per-module mutation scores from a `mutmut run` (its mutants/ folder): killed / (killed + survived),
with the mutants no test reaches, the timed-out and the not yet checked counted apart.

    python -m mutmut run --max-children 2      # or name modules: "qzoom_cli.zoom.geometry*"
    python benchmarks/mutation_scores.py        # Markdown table on stdout
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code


def scores(mutants: Path) -> dict[str, Counter]:
    table: dict[str, Counter] = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = ".".join(meta.relative_to(mutants).with_suffix("").with_suffix("").parts)
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        if not codes:
            continue
        count = table.setdefault(module, Counter())
        count.update(status_by_exit_code[code] for code in codes)
    return table


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("mutants")
    columns = ("killed", "survived", "no tests", "timeout", "not checked")
    print(f"| module | mutants | {' | '.join(columns)} | score |")
    print("|---" * (len(columns) + 3) + "|")
    for module, count in scores(folder).items():
        judged = count["killed"] + count["survived"]
        score = f"{count['killed'] / judged:.0%}" if judged else "-"
        print(f"| {module} | {sum(count.values())} | {' | '.join(str(count[c]) for c in columns)} | {score} |")


if __name__ == "__main__":
    main()
