"""The GPU harvest in two calls, each at most five minutes on a cold machine (compiles included):

    bash benchmarks/gpu_check.sh part1 OUT     # build, info, GPU tests, patch-op / LN-sum / MLP / merge rows
    bash benchmarks/gpu_check.sh part2 OUT     # merge variant sweep (all configs), tower, profile, report table

Every step is a subprocess in its own time box: SIGINT when the box ends (pytest and the benchmark then
write what they have), SIGKILL ``GRACE_S`` later. A box is the step's budget (benchmarks/README.md gives
the estimates behind it), shortened so that the part ends by ``DEADLINE_S``; a step with too little time
left is skipped. ``OUT/<part>.json`` lists every step (ok / failed / cut / skipped, seconds, box) and is
rewritten after each one; ``summarize.py`` then folds what is in OUT into results.json and results.md.

COMM_FAST_GPU_CHECK_DRY=1 (a CPU rehearsal, run by the tests): the same steps in the same boxes, each
made tiny (preset cpu-tiny, one test file) or skipped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 285      # each part, of the five minutes a call may take: 15 s for the summary and the exit
GRACE_S = 10          # between SIGINT and SIGKILL: enough for pytest's junit and the bench's last row
MIN_BOX_S = 5         # a step the deadline leaves less than this (or than its budget) is skipped, not started
PY = os.environ.get("PYTHON", sys.executable)
DRY = os.environ.get("COMM_FAST_GPU_CHECK_DRY") == "1"
BENCH = [PY, "-m", "comm_fast.cli", "bench", "--no-progress"]
PATCH_ROWS = ["resample_tokens", "resample_tokens_into_slot", "interpolate_pos_embed", "joint_preprocess"]
# the GPU tests that compile inductor graphs or need every autotune config: part 2
# tests that compile with inductor or run every config: part 2's last step, deselected from part 1's
_FLEX = "tests/models/test_packing.py::test_fused_methods_equal_the_loop_and_the_padded_batch_on_gpu"
HEAVY_TESTS = ["tests/kernels/test_gpu.py::test_compile_fullgraph", "tests/kernels/test_gpu.py::test_opcheck_cuda",
               "tests/kernels/test_gpu.py::test_autotuning_ran",
               *(f"{_FLEX}[flex-{case}-{dtype}]" for case in ("odd", "many") for dtype in ("fp32", "bf16")),
               "tests/models/test_packing.py::test_packed_loss_equals_padded_loss_on_gpu[flex]"]


@dataclasses.dataclass
class Step:
    name: str
    budget_s: float
    argv: list[str] | None                 # None: skipped, ``why`` says why
    env: dict = dataclasses.field(default_factory=dict)
    background: bool = False               # started, then waited for before the first step that needs it
    needs: str | None = None               # a background step to wait for first
    why: str = ""


def _bench(out, name, budget_s, subjects, *extra, env=None) -> Step:
    """A ``comm-fast bench`` step at the real sizes writing OUT/<name>.json (cpu-tiny, no compile: dry)."""
    dry = ["--preset", "cpu-tiny", "--no-compile"] if DRY else ["--preset", "h200"]
    argv = [*BENCH, *dry, "--ops", *subjects, "--json", os.path.join(out, f"{name}.json"),
            *[a for a in extra if not (DRY and a == "--no-compile")]]
    return Step(name, budget_s, argv, env or {})


def _pytest(out, name, budget_s, *args, env=None, needs=None) -> Step:
    """A ``pytest -m gpu`` step writing its junit report to OUT/<name>.xml (pytest writes it when cut too)."""
    return Step(name, budget_s, [PY, "-m", "pytest", *args, "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                 f"--junitxml={os.path.join(out, f'{name}.xml')}"], env or {}, needs=needs)


ENV_SCRIPT = """import json, platform, shutil, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"}
try:
    import triton; info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    import transformers; info["transformers"] = transformers.__version__
except ImportError:
    info["transformers"] = None
nvcc = shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin")
run = subprocess.run([nvcc, "--version"], capture_output=True, text=True) if nvcc else None
info["nvcc"] = run.stdout.strip().splitlines()[-1] if run and run.stdout.strip() else None
json.dump(info, open(sys.argv[1], "w"), indent=1); print(info)
"""


def _env_step(out, part) -> Step:
    return Step("env", 20, [PY, "-c", ENV_SCRIPT, os.path.join(out, f"env-{part}.json")])


def _build_steps(out) -> list[Step]:
    """Build the extension in place unless one with CUDA already loads (a warm machine); C++ only if the
    CUDA build fails, recorded. Runs in the background: the Triton steps need no extension."""
    script = ("set -o pipefail; "
              f"{PY} -c 'import sys; from comm_fast import _ext; sys.exit(0 if _ext.has_cuda() else 1)' 2>/dev/null "
              "&& { echo 'extension with CUDA already built'; exit 0; }; "
              f"{PY} setup.py build_ext --inplace && echo 'built with CUDA' && exit 0; "
              "echo 'CUDA build failed: building the C++ part only'; "
              f"COMM_FAST_NO_CUDA=1 {PY} setup.py build_ext --inplace && echo 'built without CUDA (C++ only)'")
    if DRY:
        return [Step("build", 120, None, why="dry run: the extension in place is used")]
    return [Step("build", 150, ["bash", "-c", script], env={"TORCH_CUDA_ARCH_LIST": "9.0"}, background=True)]


def part1(out) -> list[Step]:
    one = {"COMM_FAST_TUNE_CONFIGS": "1"}
    tests = ["tests/kernels/test_gpu.py"] if DRY else ["tests/kernels"]
    other = ["tests/csrc/test_patch_ext.py"] if DRY else ["tests", "--ignore=tests/kernels"]
    return [
        *_build_steps(out),
        _env_step(out, "part1"),
        _pytest(out, "tests-triton", 100, *tests, *[f"--deselect={t}" for t in HEAVY_TESTS], env=one),
        Step("info", 20, [PY, "-m", "comm_fast.info"], needs="build"),
        # the other GPU tests (the CUDA patch ops' among them) need the extension
        _pytest(out, "tests-other", 45, *other, *[f"--deselect={t}" for t in HEAVY_TESTS], env=one, needs="build"),
        _bench(out, "bench-patch", 50, PATCH_ROWS, "--no-compile", env=one),
        _variants_step(out),
    ]


def part1_rest(out, variants) -> list[Step]:
    """One forward row per merge variant the op offers, forward + backward of the default, then LN-sum and
    MLP with their compiled references (one cheap graph each; the merge's compile is part 2's); one
    config per kernel."""
    one = {"COMM_FAST_TUNE_CONFIGS": "1"}
    steps = [_bench(out, f"bench-merge-{v}", 30, ["multilevel_merge"], "--no-compile",
                    env={**one, "COMM_FAST_MERGE_VARIANT": v}) for v in variants]
    if not variants:
        steps.append(_bench(out, "bench-merge", 30, ["multilevel_merge"], "--no-compile", env=one))
    return steps + [_bench(out, "bench-merge-fwd-bwd", 40, ["multilevel_merge_fwd_bwd"], "--no-compile", env=one),
                    _bench(out, "bench-lnws-mlp", 60, ["layernorm_weighted_sum", "fused_mlp"], env=one)]


def _variants_step(out) -> Step:
    # a subprocess: importing the package (torch, CUDA) is not the driver's business
    return Step("merge-variants", 20, [PY, os.path.abspath(__file__), "variants", out])


def part2(out) -> list[Step]:
    report = Step("kernel-report", 150, [PY, "-m", "comm_fast.kernel_report", "--preset", "h200", "--json",
                                         os.path.join(out, "kernel_report.json")], background=True)
    if not any(os.path.exists(os.path.join(ROOT, "comm_fast", n)) for n in ("kernel_report.py", "kernel_report")):
        report.argv, report.why = None, "comm_fast.kernel_report is absent from this tree"
    elif DRY:
        report.argv, report.why = None, "dry run: the report compiles every kernel (minutes on a CPU)"
    return [*_build_steps(out), report, _env_step(out, "part2"), _variants_step(out)]


def part2_rest(out, variants) -> list[Step]:
    """Every variant with all autotune configs, the tower without its compiled reference (a cold inductor
    of two ViT-L encoders outlasts the part), a short training profile; last, cut first when time runs
    out, the tests that need inductor or every config, and the compiled merge references (~25 + 45 s)."""
    merge = ["multilevel_merge", "multilevel_merge_fwd_bwd"]
    sweep = [_bench(out, f"sweep-merge-{v}", 60, merge, "--no-compile", env={"COMM_FAST_MERGE_VARIANT": v})
             for v in variants] or [_bench(out, "sweep-merge", 60, merge, "--no-compile")]
    tower = _bench(out, "bench-tower", 75, ["tower"], "--no-compile")
    profile = Step("profile", 75, [PY, "-m", "comm_fast.cli", "profile-train", "--preset", "1b", "--steps", "3",
                                   "--warmup", "1", "--baseline", "--json", os.path.join(out, "profile.json")])
    tower.needs = profile.needs = "build"
    if DRY:
        tower.argv, tower.why = None, "dry run: two 24-block encoders take seconds to build on a CPU"
        profile.argv, profile.why = None, "dry run: a training profile takes a minute on a shared CPU"
    return [*sweep, tower, profile, _pytest(out, "tests-heavy", 75, *HEAVY_TESTS),
            _bench(out, "bench-merge-compiled", 100, merge)]


def merge_variants() -> tuple[list[str], str]:
    """The merge variants the op offers (``comm_fast.ops.merge_variants.VARIANTS``, each a value of
    COMM_FAST_MERGE_VARIANT), and where the list came from."""
    sys.path.insert(0, ROOT)
    try:
        from comm_fast.ops import merge_variants as mv
    except ImportError as exc:
        return [], f"comm_fast.ops.merge_variants does not import ({exc}): one merge path, measured as it is"
    return [str(v) for v in mv.VARIANTS], "comm_fast.ops.merge_variants.VARIANTS"


# ------------------------------------------------------------------------------------- running
def _wait_box(proc, box_s, grace_s) -> tuple[int, str]:
    """Wait for ``proc`` at most ``box_s`` seconds, then SIGINT its process group, and SIGKILL it
    ``grace_s`` later. Returns (rc, 'ok' | 'failed' | 'cut')."""
    try:
        rc = proc.wait(timeout=max(box_s, 0))
        return rc, "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        pass
    _signal(proc, signal.SIGINT)
    try:
        return proc.wait(timeout=grace_s), "cut"
    except subprocess.TimeoutExpired:
        _signal(proc, signal.SIGKILL)
        return proc.wait(), "cut"


def _hear_sigint():
    """In the child before exec: SIGINT back to its default, so that the box's SIGINT reaches pytest and the
    benchmark even when this driver was started with it ignored (a background job of a shell does)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _env(extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRITON_DEFAULT_FP_FUSION="1", MAX_JOBS=os.environ.get("MAX_JOBS", "16"))
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("COMM_FAST_TUNE_CONFIGS", None)  # each step says what it wants
    env.update(extra)
    return env


class Part:
    """Runs steps in order against one deadline and records each in OUT/<name>.json as it ends."""

    def __init__(self, name, out, deadline_s=DEADLINE_S, grace_s=GRACE_S):
        self.name, self.out, self.grace_s = name, out, grace_s
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.record = {"part": name, "dry_run": DRY, "deadline_s": deadline_s, "started": time.strftime("%H:%M:%S"),
                       "steps": []}
        self.background: dict[str, tuple] = {}
        os.makedirs(out, exist_ok=True)
        self._save()

    def _save(self):
        path = os.path.join(self.out, f"{self.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.record, f, indent=1)
        os.replace(path + ".tmp", path)

    def _box(self, step) -> float | None:
        """The step's budget, shortened to end by the deadline; None if too little is left to start it."""
        budget, left = step.budget_s, self.deadline - time.monotonic() - self.grace_s
        return None if left < min(MIN_BOX_S, budget) else min(budget, left)

    def _note(self, step, status, rc=None, seconds=0.0, box=None, why=""):
        entry = {"step": step.name, "status": status, "rc": rc, "seconds": round(seconds, 1), "env": step.env,
                 "budget_s": step.budget_s, "box_s": None if box is None else round(box, 1),
                 "log": f"{step.name}.log", "why": why or step.why}
        self.record["steps"] = [e for e in self.record["steps"] if e["step"] != step.name] + [entry]
        self.record["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self._save()
        rc_text, box_text = "" if rc is None else f" (rc {rc})", "" if box is None else f" of a {box:.0f} s box"
        why_text = f": {entry['why']}" if entry["why"] else ""
        print(f"== {time.strftime('%H:%M:%S')} {step.name}: {status}{rc_text} in {seconds:.0f} s{box_text}{why_text}",
              flush=True)

    def wait_for(self, name):
        if name not in self.background:
            return
        step, proc, box, start = self.background.pop(name)
        rc, status = _wait_box(proc, box - (time.monotonic() - start), self.grace_s)
        self._note(step, status, rc, time.monotonic() - start, box)

    def run(self, steps):
        for step in steps:
            if step.needs:
                self.wait_for(step.needs)
            if step.argv is None:
                self._note(step, "skipped")
                continue
            box = self._box(step)
            if box is None:
                left = max(0.0, self.deadline - time.monotonic())
                self._note(step, "skipped", why=f"{left:.0f} s left before the part's deadline")
                continue
            log = open(os.path.join(self.out, f"{step.name}.log"), "ab")
            start = time.monotonic()
            proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(step.env),
                                    start_new_session=True, preexec_fn=_hear_sigint)
            log.close()
            if step.background:
                self.background[step.name] = (step, proc, box, start)
                print(f"== {time.strftime('%H:%M:%S')} {step.name}: started in the background ({box:.0f} s box)",
                      flush=True)
                continue
            rc, status = _wait_box(proc, box, self.grace_s)
            self._note(step, status, rc, time.monotonic() - start, box)

    def finish(self):
        for name in list(self.background):
            self.wait_for(name)
        self.record["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self._save()


def _variants_from(out) -> list[str]:
    try:
        with open(os.path.join(out, "merge_variants.json")) as f:
            return json.load(f)["variants"]
    except (OSError, ValueError, KeyError):
        return []  # the listing step failed or was cut: the op's default path is measured


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("part1", "part2", "variants"):
        print("usage: gpu_check.sh part1|part2 OUT_DIR", file=sys.stderr)
        return 2
    what, out = argv[0], os.path.abspath(argv[1])
    if what == "variants":  # a step of its own: importing the package is not the driver's business
        variants, source = merge_variants()
        with open(os.path.join(out, "merge_variants.json"), "w") as f:
            json.dump({"variants": variants, "source": source}, f)
        print(variants, source)
        return 0
    part = Part(what, out)
    if what == "part1":
        part.run(part1(out))
        part.run(part1_rest(out, _variants_from(out)))
    else:
        part.run(part2(out))
        part.run(part2_rest(out, _variants_from(out)))
    part.finish()
    subprocess.run([PY, os.path.join(ROOT, "benchmarks", "summarize.py"), out], cwd=ROOT, timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
