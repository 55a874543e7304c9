"""Where the tests of the authors' comparison (benchmarks/authors_compare.py) can run: the git
mirror of stepfun-ai/NextStep-1 on this machine, and a transformers their code imports from."""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import authors_compare  # noqa: E402

MIRROR = Path(authors_compare.DEFAULT_REPO)
AUTHORS_IMPORT = "transformers.modeling_attn_mask_utils"  # their modeling_nextstep.py imports it
AUTHORS_IMPORT_MISSING = (f"this transformers has no {AUTHORS_IMPORT}, which the authors' code imports (5.24 lacks "
                          "it; 5.17 and 5.25 have it)")


def authors_import_missing() -> bool:
    return importlib.util.find_spec(AUTHORS_IMPORT) is None


have_mirror = pytest.mark.skipif(not MIRROR.exists() or shutil.which("git") is None,
                                 reason=f"the authors' code (a git mirror of stepfun-ai/NextStep-1 at {MIRROR}) "
                                        "is not here")
authors_transformers = pytest.mark.skipif(authors_import_missing(), reason=AUTHORS_IMPORT_MISSING)
