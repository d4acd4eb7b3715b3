"""The package as users import it: comm_fast.kernels is the top-level kernels/ folder, installed or run
from the source tree, and nothing else of the source tree becomes part of comm_fast."""
import importlib.util
import os
import site
import subprocess
import sys

import comm_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_map_to_the_kernels_folder_and_nothing_else_leaks_in():
    import comm_fast.kernels.fused_mlp as fused_mlp

    assert os.path.samefile(os.path.dirname(fused_mlp.__file__), os.path.join(ROOT, "kernels"))
    for name in ("setup", "tests", "benchmarks", "csrc"):
        assert importlib.util.find_spec(f"comm_fast.{name}") is None, name
    assert not os.path.isdir(os.path.join(ROOT, "comm_fast", "kernels"))  # one copy of the kernels


def test_source_tree_on_pythonpath_without_the_install():
    """As benchmarks/gpu_check.sh runs it: no site hooks (-S, so no editable-install finder)."""
    paths = os.pathsep.join([ROOT, *site.getsitepackages()])
    code = ("import sys, comm_fast.kernels.fused_mlp as m, importlib.util as u;"
            "print(m.__file__); print(u.find_spec('comm_fast.setup'))")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=os.sep,
                          env={**os.environ, "PYTHONPATH": paths})
    assert proc.returncode == 0, proc.stderr[-2000:]
    kernel_file, setup_spec = proc.stdout.split()
    assert os.path.samefile(os.path.dirname(kernel_file), os.path.join(ROOT, "kernels")) and setup_spec == "None"
    assert comm_fast.__version__
