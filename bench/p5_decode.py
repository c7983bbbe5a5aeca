"""P5: bench/p1_annotation.py's run at the toy balance (`idm=toy`: its decode-bound settings); prints P5's line.

    .venv/bin/python bench/p5_decode.py [the same key=value arguments as p1_annotation.py]

P5 asks whether decoding keeps its speed inside the pipeline, so it is measured where decoding is the bound
(the toy IDM, a sixth of decoding's cost); at the real balance (p1_annotation.py's default) the IDM bounds
frames/s instead. `make bench` runs p1_annotation.py (P1, P7) and this.
"""

from __future__ import annotations

import sys

from p1_annotation import main

if __name__ == "__main__":
    main(["idm=toy", *sys.argv[1:], "emit=P5"])
    sys.exit(0)
