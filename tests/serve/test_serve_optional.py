"""The package imports without the server's dependencies, and the server says which extra it needs."""
from __future__ import annotations

import subprocess
import sys


def test_package_imports_without_fastapi_and_the_server_names_its_extra():
    code = """
import sys
for name in ("fastapi", "uvicorn", "starlette", "multipart", "python_multipart"):
    sys.modules[name] = None  # as if not installed: importing them raises ImportError
import nda_ann
from nda_ann.serve import ServeConfig, create_app
assert ServeConfig().max_files >= 1
try:
    create_app("no-such-index")
except ImportError as err:
    print("ERR", err)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ERR" in r.stdout and "nda-ann[serve]" in r.stdout
