"""Fold a gpu_check.sh output directory into results.json and results.md, and print the table."""
import json
import os
import sys


def gpu_tests(path: str) -> dict | None:
    """Counts and failures from pytest's junit XML (None if the step wrote none)."""
    import xml.etree.ElementTree as ET

    if not os.path.exists(path):
        return None
    try:
        cases = ET.parse(path).getroot().iter("testcase")
    except ET.ParseError as exc:  # pytest killed while writing it
        return {"passed": 0, "failed": 0, "skipped": 0, "failures": [("gpu-tests.xml", f"unreadable: {exc}")]}
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in cases:
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append((f"{case.get('classname')}::{case.get('name')}",
                                    (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""))
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def main(out: str) -> int:
    def load(name):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f) if name.endswith(".json") else f.read()

    bench, profile = load("bench.json"), load("profile.json")
    tower = load("bench-tower.json")  # the tower runs as a step of its own
    if tower:
        bench = bench or {"machine": tower["machine"], "rows": []}
        bench["rows"] += tower["rows"]
    tests = gpu_tests(os.path.join(out, "gpu-tests.xml"))
    result = {"env": load("env.txt"), "status": load("status.txt"), "gpu_tests": tests, "bench": bench,
              "profile": profile}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = ["# comm_fast GPU check", "", "```", (result["env"] or "").strip(), (result["status"] or "").strip(), "```", ""]
    if tests:
        lines += [f"GPU tests (`pytest -m gpu`): {tests['passed']} passed, {tests['failed']} failed, "
                  f"{tests['skipped']} skipped" + "".join(f"\n- FAILED {name}: {why}" for name, why in tests["failures"]),
                  ""]
    if bench:
        m = bench["machine"]
        lines += [f"Benchmarks on {m['device']}, {m['date']}: copy {m['copy_gbs']} GB/s, "
                  + ", ".join(f"{k} {v}" for k, v in m.items() if k.startswith("gemm")), "",
                  "| subject | shape | backend | fused ms | eager ms | compile ms | x eager | x compile | % roofline "
                  "| peak MB | eager peak MB | note |", "|" + "---|" * 12]
        for r in bench["rows"]:
            if r.get("error"):
                lines.append(f"| {r['name']} | | FAILED |" + " |" * 8 + f" {r['error']} |")
                continue
            lines.append(f"| {r['name']} | {r['shape']} | {r['backend']} | {r['ms']} | {r['ref_ms']} | "
                         f"{r['compile_ms']} | {r['speedup_vs_ref']} | {r['speedup_vs_compile']} | "
                         f"{r['pct_of_roofline']} | {r['peak_mem_mb']} | {r['ref_peak_mem_mb']} | {r['note']} |")
    if profile:
        lines += ["", "Training profile:", "```", json.dumps(profile, indent=1)[:4000], "```"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
