"""P7: measured by the same annotation run as P1 (see bench/p1_annotation.py); this prints only P7's line.

    .venv/bin/python bench/p7_utilisation.py [the same key=value arguments as p1_annotation.py]

`make bench` runs p1_annotation.py once, which prints P1 and P7 from one run.
"""

from __future__ import annotations

import sys

from p1_annotation import main

if __name__ == "__main__":
    main([*sys.argv[1:], "emit=P7"])
    sys.exit(0)
