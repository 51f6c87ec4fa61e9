"""dvt_shared is Python + NumPy only: importing every one of its modules imports no framework."""
import json
import subprocess
import sys

import pytest

FRAMEWORKS = ("torch", "mindspore", "timm", "torchvision", "onnx", "onnxruntime")
# Imports every module of dvt_shared, then lists the frameworks that came with them.
CHECK = """
import importlib, json, pkgutil, sys
import dvt_shared
{extra}
for module in pkgutil.iter_modules(dvt_shared.__path__):
    importlib.import_module(f"dvt_shared.{{module.name}}")
loaded = sorted(name for name in {frameworks!r} if name in sys.modules)
print(json.dumps([len(list(pkgutil.iter_modules(dvt_shared.__path__))), loaded]))
"""


def imported_frameworks(extra: str = "") -> tuple[int, list[str]]:
    code = CHECK.format(extra=extra, frameworks=FRAMEWORKS)
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    count, loaded = json.loads(result.stdout)
    return count, loaded


def test_importing_every_dvt_shared_module_imports_no_framework():
    count, loaded = imported_frameworks()
    assert count >= 10, "pkgutil found too few dvt_shared modules: the check would be vacuous"
    assert loaded == []


@pytest.mark.parametrize("framework", ["torch"])
def test_the_check_sees_a_framework_that_is_imported(framework):
    _, loaded = imported_frameworks(extra=f"import {framework}")
    assert loaded == [framework]
