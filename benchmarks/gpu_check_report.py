"""What `gpu_check.py` writes into OUT: SUMMARY.md, the op and profile tables (CSV and JSON).

SUMMARY.md is rewritten after every stage, so a run killed part way leaves what it measured, with the
stage it was in marked `running`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

PROFILE_COLUMNS = ["config", "backend", "samples_per_s", "tokens_per_s", "audio_s_per_s", "step_ms",
                   "mfu_measured", "matmul_flops", "mfu", "peak_flops", "peak_source", "peak_mem_bytes",
                   "peak_mem_kind", "batch_size", "clones", "precision", "model", "device"]


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def add_profile(check, config: str, results: dict[str, dict]) -> None:
    """Keep one config's `d2v profile --compare` records, with MFU against this run's matmul rate;
    rewrite profiles.json and profiles.csv."""
    matmul = check.environment.get("ceilings", {}).get("matmul_flops")
    for label, record in results.items():
        record["backend_setting"] = label
        record["matmul_flops"] = matmul
        record["mfu_measured"] = record["achieved_flops"] / matmul if matmul else None
    check.profiles[config] = results
    (check.out / "profiles.json").write_text(json.dumps(check.profiles, indent=2) + "\n")
    rows = [{**record, "config": name, "backend": label}
            for name, by_label in check.profiles.items() for label, record in by_label.items()]
    write_csv(check.out / "profiles.csv", rows, PROFILE_COLUMNS)


def summary(check, final: bool) -> str:
    """The whole SUMMARY.md of the run so far."""
    env = check.environment
    failed = [s.name for s in check.stages if s.kind == "check" and check.outcomes[s.name].status == "failed"]
    running = [name for name, o in check.outcomes.items() if o.status == "running"]
    if final:
        result = f"FAILED: {', '.join(failed)}" if failed else "PASSED (every check stage)"
    else:
        result = f"in progress ({', '.join(running) or 'starting'})"
    mode = ("smoke mode: the CPU, Triton's interpreter, tiny shapes, the debug models"
            if env.get("mode") == "smoke" else "GPU mode")
    lines = [f"# gpu-check on {env.get('gpu', '?')}: {result}", "", f"{mode}; `make gpu-check OUT=...` "
             f"(benchmarks/gpu_check.py).", ""]
    lines += _machine_table(check)
    lines += ["", "## Stages", "", "| stage | kind | status | seconds | budget s | note |", "|---|---|---|---|---|---|"]
    for stage in check.stages:
        o = check.outcomes[stage.name]
        budget = stage.smoke_budget_s if check.smoke else stage.budget_s
        seconds = f"{o.seconds:.0f}" if o.status in ("passed", "failed") else ""
        lines.append(f"| {stage.name} | {stage.kind} | **{o.status}** | {seconds} | {budget:.0f} | "
                     f"{_cell(o.note)} |")
    problems = [(name, line) for name, o in check.outcomes.items() for line in o.details.get("failed", [])]
    if problems:
        lines += ["", "## Failed tests", ""]
        lines += [f"- {name}: `{_cell(line)}`" for name, line in problems[:20]]
    lines += _ceilings(env.get("ceilings"))
    lines += _op_table(check.op_rows)
    lines += _profile_table(check.profiles)
    lines += ["", "Files: SUMMARY.md, stages.jsonl, environment.json, ops.csv, profiles.csv, "
              "profiles.json, log.txt (every command and its output).", ""]
    return "\n".join(lines)


def _machine_table(check) -> list[str]:
    env = check.environment
    imports = env.get("imports", {})
    packages = env.get("packages", {})
    rows = [("GPU", f"{env.get('gpu', '?')} ({env.get('gpu_memory', '-')})"
             + (f", compute capability {imports['capability']}" if imports.get("capability") else "")),
            ("driver", env.get("driver", "?")), ("CUDA (torch build)", imports.get("cuda") or "-"),
            ("python", env.get("python", "?"))]
    rows += [(name, version) for name, version in packages.items()]
    rows += [("git commit", env.get("git", "?")), ("started (UTC)", env.get("started", "?")),
             ("elapsed", f"{env.get('elapsed_s', 0):.0f} s of a {check.total_s:.0f} s total budget")]
    return ["| | |", "|---|---|", *(f"| {key} | {_cell(str(value))} |" for key, value in rows)]


def _ceilings(ceilings: dict | None) -> list[str]:
    if not ceilings:
        return []
    return ["", "## Ceilings (measured in this run)", "",
            f"- device-to-device copy: {ceilings['copy_gbps']:.1f} GB/s (bytes read + written, "
            f"{ceilings['copy_bytes'] // 2**20} MiB tensor) on {ceilings['device']}",
            f"- {ceilings['matmul_dtype']} matmul {ceilings['matmul_n']}^3: "
            f"{ceilings['matmul_flops'] / 1e12:.2f} TFLOP/s (best of 10)"]


def _op_table(rows: list[dict]) -> list[str]:
    timed = [r for r in rows if r.get("median_ms")]
    if not timed:
        return []
    lines = ["", "## Op timings (ops.csv; fraction of the copy bandwidth measured before each case)", "",
             "| op | case | provider | median ms | GB/s | of copy | x reference | x torch.compile |",
             "|---|---|---|---|---|---|---|---|"]
    compiled = {(r["op"], r["case"]): float(r["median_ms"]) for r in timed if r["provider"] == "torch_compile"}
    for r in timed:
        ms = float(r["median_ms"])
        vs_compile = compiled.get((r["op"], r["case"]))
        lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {ms:.3f} | {float(r['gbps']):.1f} | "
                     f"{float(r['fraction_of_copy']):.1%} | {r.get('vs_reference') or '-'} | "
                     f"{f'{vs_compile / ms:.2f}' if vs_compile else '-'} |")
    return lines


def _profile_table(profiles: dict[str, dict]) -> list[str]:
    if not profiles:
        return []
    lines = ["", "## Profiles (profiles.csv; d2v profile --compare kernels.backend=reference,auto)", "",
             "| config | backend | batch | samples/s | step ms | MFU (this run's matmul) | MFU (profile's peak) "
             "| peak memory MiB |", "|---|---|---|---|---|---|---|---|"]
    for config, by_label in profiles.items():
        for label, r in by_label.items():
            measured = f"{r['mfu_measured']:.1%}" if r.get("mfu_measured") is not None else "-"
            lines.append(f"| {config} | {label} | {r['batch_size']} | {r['samples_per_s']:.1f} | "
                         f"{r['step_ms']:.1f} | {measured} | {r['mfu']:.1%} | "
                         f"{r['peak_mem_bytes'] / 2**20:.0f} |")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
