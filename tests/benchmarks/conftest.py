"""The benchmarks are programs in the repository, not an installed package: make
``import benchmarks`` work however pytest is started (``python -m pytest`` adds the working
directory to ``sys.path``; a bare ``pytest`` does not)."""

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parents[2])
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)
