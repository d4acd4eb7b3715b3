"""CMakeLists.txt builds the same comm_fast._C module as setup.py: the documented command, then the
built module loaded on its own and compared with the one the suite uses."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from comm_fast import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUN_BUILT = """
import glob, importlib.util, sys, torch
path, = glob.glob(sys.argv[1] + "/_C*.so")
spec = importlib.util.spec_from_file_location("comm_fast._C", path)
built = importlib.util.module_from_spec(spec)
spec.loader.exec_module(built)
assert built.__file__ == path
x = torch.load(sys.argv[2])
torch.save({m: built.resample_tokens(x, 9, 13, 6, 5, m) for m in MODES}, sys.argv[3])
"""
MODES = ("bilinear", "bicubic", "area")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
@pytest.mark.skipif(_ext.load()[0] is None, reason="no setup.py-built extension to compare with")
@pytest.mark.skipif(os.environ.get("COMM_FAST_NATIVE") == "1", reason="setup.py built with -march=native")
def test_cmake_builds_the_same_extension(tmp_path):
    out = tmp_path / "module"
    configure = ["cmake", "-S", ROOT, "-B", str(tmp_path / "build"), f"-DCOMM_FAST_OUTPUT_DIR={out}",
                 "-DCOMM_FAST_NO_CUDA=ON"]
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")):  # else CMakeLists.txt picks .venv
        configure.append(f"-DPython_EXECUTABLE={sys.executable}")
    for cmd in (configure, ["cmake", "--build", str(tmp_path / "build"), "-j", str(os.cpu_count() or 2)]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, (cmd, res.stdout[-3000:], res.stderr[-3000:])
    # the cmake-built module in a process of its own (a process keeps one extension module per name)
    x = torch.randn(2, 9 * 13, 5)
    torch.save(x, tmp_path / "x.pt")
    code = f"MODES = {MODES!r}" + RUN_BUILT
    res = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    built = torch.load(tmp_path / "y.pt")
    installed, _ = _ext.load()
    for mode in MODES:
        assert torch.equal(built[mode], installed.resample_tokens(x, 9, 13, 6, 5, mode)), mode
