"""Fold a gpu_check.sh output directory into results.json and results.md, and print the table."""
import json
import os
import sys


def main(out: str) -> int:
    def load(name):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f) if name.endswith(".json") else f.read()

    bench, profile = load("bench.json"), load("profile.json")
    result = {"env": load("env.txt"), "status": load("status.txt"), "bench": bench, "profile": profile}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = ["# comm_fast GPU check", "", "```", (result["env"] or "").strip(), (result["status"] or "").strip(), "```", ""]
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
