"""Fold a gpu_check output directory (part 1, part 2, or both) into results.json and results.md.

Only what the steps wrote is reported: a part that did not run, a step that was cut or skipped, a file
that is missing or unreadable is said to be so, never filled in.

    python benchmarks/summarize.py OUT_DIR
"""
import glob
import json
import os
import sys

PARTS = ("part1", "part2")


def _load(path):
    """(content, None) or (None, why not)."""
    if not os.path.exists(path):
        return None, "not written"
    try:
        with open(path) as f:
            return (json.load(f) if path.endswith(".json") else f.read()), None
    except (OSError, ValueError) as exc:  # a step killed while writing
        return None, f"unreadable: {type(exc).__name__}: {exc}"


def junit(path: str) -> dict:
    """Counts and failures from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    try:
        cases = list(ET.parse(path).getroot().iter("testcase"))
    except (OSError, ET.ParseError) as exc:  # pytest killed while writing it
        return {**out, "unreadable": f"{type(exc).__name__}: {exc}"}
    for case in cases:
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            out["failed"] += 1
            message = (bad.get("message") or "").strip().splitlines()
            name = f"{case.get('classname')}::{case.get('name')}"
            out["failures"].append([name, message[0][:200] if message else ""])
        elif case.find("skipped") is not None:
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def collect(out: str) -> dict:
    result = {"parts": {}, "steps": [], "tests": {}, "bench": {"machine": None, "rows": []}}
    for part in PARTS:
        record, why = _load(os.path.join(out, f"{part}.json"))
        if record is None:
            record = {"missing": f"{part}.json {why}" + (": the part did not run" if why == "not written" else "")}
        result["parts"][part] = record
        for step in record.get("steps", []):
            result["steps"].append({"part": part, **step})
    steps = {s["step"]: s for s in result["steps"]}
    for part in PARTS:
        result[f"env_{part}"] = _load(os.path.join(out, f"env-{part}.json"))[0]
    result["info"] = _load(os.path.join(out, "info.log"))[0]
    result["build"] = _tail(os.path.join(out, "build.log"))
    result["merge_variants"] = _load(os.path.join(out, "merge_variants.json"))[0]
    for path in sorted(glob.glob(os.path.join(out, "tests-*.xml"))):
        result["tests"][os.path.basename(path)[:-4]] = junit(path)
    # every bench file a step wrote, in the order the steps ran; rows tagged with the step's settings
    names = [s["step"] for s in result["steps"]]
    files = sorted(glob.glob(os.path.join(out, "*.json")), key=lambda p: _order(names, p))
    for path in files:
        name = os.path.basename(path)[:-5]
        if name not in steps or not (name.startswith("bench-") or name.startswith("sweep-")):
            continue
        data, why = _load(path)
        if data is None:
            result["bench"]["rows"].append({"name": name, "error": f"{name}.json {why}"})
            continue
        result["bench"]["machine"] = result["bench"]["machine"] or data.get("machine")
        env = steps[name].get("env", {})
        for row in data.get("rows", []):
            row.update(step=name, variant=env.get("COMM_FAST_MERGE_VARIANT"),
                       configs=env.get("COMM_FAST_TUNE_CONFIGS", "all"))
            result["bench"]["rows"].append(row)
    result["profile"] = _load(os.path.join(out, "profile.json"))[0]
    report, why = _load(os.path.join(out, "kernel_report.json"))
    result["kernel_report"] = report if report is not None else {"missing": _report_missing(steps, why)}
    result["report_vs_measured"] = report_vs_measured(report, result["bench"]["rows"]) if report is not None else []
    return result


def _order(names, path):
    name = os.path.basename(path)[:-5]
    return names.index(name) if name in names else len(names)


def _tail(path, n=3):
    text, _ = _load(path)
    return None if text is None else "\n".join(text.strip().splitlines()[-n:])


def _report_missing(steps, why):
    step = steps.get("kernel-report")
    if step is None:
        return "part 2 did not run"
    return f"kernel_report.json {why}: step {step['status']}" + (f" ({step['why']})" if step.get("why") else "")


def _entries(report):
    if isinstance(report, list):
        return report
    return next((report[k] for k in ("entries", "rows", "kernels") if isinstance(report.get(k), list)), [])


def _first(entry, test):
    return next((v for k, v in entry.items() if test(k.lower()) and isinstance(v, (int, float))), None)


def report_vs_measured(report, rows) -> list[dict]:
    """Each report entry with a prediction beside the bench row of its op (and merge variant), the full
    sweep's row preferred over part 1's one-config row. The report's figures are predictions."""
    measured = [r for r in rows if not r.get("error") and r.get("ms") is not None]
    out = []
    for e in _entries(report):
        if not isinstance(e, dict):
            continue
        kernel = str(e.get("kernel") or e.get("name") or "?")
        pred_ms = _first(e, lambda k: "pred" in k and k.endswith("ms"))
        pred_pct = _first(e, lambda k: "pred" in k and ("pct" in k or "%" in k or "percent" in k))
        match = [r for r in measured if r["name"].split("_fwd")[0] in kernel
                 and (e.get("variant") is None or r.get("variant") in (None, e.get("variant")))]
        match.sort(key=lambda r: (r.get("configs") != "all", r["name"] != kernel.split(".")[0]))
        row = match[0] if match else None
        out.append({"kernel": kernel, "variant": e.get("variant"), "config": e.get("config"), "dtype": e.get("dtype"),
                    "predicted_ms": pred_ms, "predicted_pct": pred_pct,
                    "measured": None if row is None else {k: row.get(k) for k in
                                                          ("name", "step", "variant", "configs", "ms",
                                                           "pct_of_roofline")}})
    return out


def markdown(result: dict) -> str:
    lines = ["# comm_fast GPU check", ""]
    for part in PARTS:
        rec = result["parts"][part]
        if "missing" in rec:
            lines.append(f"**{part}: not run** ({rec['missing']}).")
        else:
            cut = [s["step"] for s in rec["steps"] if s["status"] in ("cut", "skipped")]
            dry = " (dry run on a CPU: no figure below is a GPU figure)" if rec.get("dry_run") else ""
            lines.append(f"**{part}**{dry}: started {rec['started']}, {rec.get('elapsed_s')} s of a {rec['deadline_s']} s deadline"
                         + (f"; cut or skipped: {', '.join(cut)}" if cut else ""))
    lines += ["", "| part | step | status | s | box s | budget s | why |", "|---|---|---|---|---|---|---|"]
    for s in result["steps"]:
        status = s["status"] if s["rc"] in (None, 0) else f"{s['status']} (rc {s['rc']})"
        lines.append(f"| {s['part']} | {s['step']} | {status} | {s['seconds']} | {_fmt(s['box_s'])} | {s['budget_s']} "
                     f"| {s['why']} |")
    for part in PARTS:
        if result[f"env_{part}"]:
            lines += ["", f"Environment ({part}): " + ", ".join(f"{k} {v}" for k, v in result[f"env_{part}"].items())]
    if result["build"]:
        lines += ["", "Build (last lines):", "```", result["build"], "```"]
    if result["merge_variants"]:
        mv = result["merge_variants"]
        lines += ["", f"Merge variants: {', '.join(mv['variants']) or 'none listed'} ({mv['source']})"]
    for name, t in result["tests"].items():
        lines += ["", f"{name}: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                  + (f" (junit {t['unreadable']})" if t.get("unreadable") else "")]
        lines += [f"- FAILED {case}: {why}" for case, why in t["failures"]]
    lines += _bench_md(result["bench"])
    if result["report_vs_measured"]:
        lines += ["", "Kernel report (PREDICTED, a first-order model) beside the measured rows:", "",
                  "| kernel | variant | config | dtype | predicted ms | predicted % | measured ms "
                  "| measured % roofline | measured by |", "|" + "---|" * 9]
        for r in result["report_vs_measured"]:
            m = r["measured"] or {}
            lines.append(f"| {r['kernel']} | {r['variant'] or ''} | {r['config'] or ''} | {r['dtype'] or ''} | "
                         f"{_fmt(r['predicted_ms'])} | {_fmt(r['predicted_pct'])} | {_fmt(m.get('ms'))} | "
                         f"{_fmt(m.get('pct_of_roofline'))} | {m.get('step', 'not measured')}"
                         f"{' (' + str(m['configs']) + ' configs)' if m else ''} |")
    elif "missing" in result["kernel_report"]:
        lines += ["", f"Kernel report: {result['kernel_report']['missing']}."]
    if result["profile"]:
        lines += ["", "Training profile (`profile-train --preset 1b`):", "```",
                  json.dumps(result["profile"], indent=1)[:4000], "```"]
    return "\n".join(lines) + "\n"


def _fmt(v):
    return "" if v is None else v


def _bench_md(bench) -> list[str]:
    if not bench["rows"]:
        return ["", "No benchmark rows were written."]
    m = bench["machine"] or {}
    lines = ["", f"Benchmarks on {m.get('device', '?')}, {m.get('date', '?')}, preset {m.get('preset', '?')}: copy "
             f"{m.get('copy_gbs', '?')} GB/s, " + ", ".join(f"{k} {v}" for k, v in m.items() if k.startswith("gemm")),
             "",
             "| subject | variant | configs | shape | backend | fused ms | eager ms | compile ms | x eager | x compile "
             "| % roofline | peak MB | eager peak MB | note |", "|" + "---|" * 14]
    for r in bench["rows"]:
        head = f"| {r['name']} | {r.get('variant') or ''} | {r.get('configs', '')} |"
        if r.get("error"):
            lines.append(f"{head} | FAILED |" + " |" * 8 + f" {r['error']} |")
            continue
        note = "; ".join(x for x in (("OUTPUTS DIFFER: " + r["mismatch"]) if r.get("mismatch") else "", r.get("note"),
                                     r.get("write_error")) if x)
        lines.append(f"{head} {r['shape']} | {r['backend']} | {r['ms']} | {r['ref_ms']} | {_fmt(r['compile_ms'])} | "
                     f"{r['speedup_vs_ref']} | {_fmt(r['speedup_vs_compile'])} | {_fmt(r['pct_of_roofline'])} | "
                     f"{_fmt(r['peak_mem_mb'])} | {_fmt(r['ref_peak_mem_mb'])} | {note} |")
    return lines


def main(out: str) -> int:
    result = collect(out)
    text = markdown(result)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
