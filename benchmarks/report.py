"""What a run writes: the environment, per-case tables, results.json, summary.md and plots.

Records come from :func:`benchmarks.harness.run_case`; nothing here measures anything
except :func:`hopper_report`, which compiles the Triton kernels for sm_90 (no GPU needed).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from .harness import CEILING_OF_METRIC, all_skipped

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def device_slug(device: torch.device) -> str:
    """"cpu", or the GPU's name made path-safe: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def _run(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=30,
                              cwd=REPO_ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _driver_version() -> str | None:
    version = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if version:
        return version.splitlines()[0]
    try:  # no nvidia-smi in the container: the kernel module says it too
        return Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def environment(device: torch.device) -> dict:
    import docqa_fast

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "driver": _driver_version() if device.type == "cuda" else None,
        "cuda_runtime": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "docqa_fast": docqa_fast.__version__,
        "backends": {name: str(status) for name, status in docqa_fast.backends().items()},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine skews CPU timings; this says how busy it was at the start.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _run(["git", "rev-parse", "HEAD"]),  # None outside git or before the first commit
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------- hopper

def hopper_report() -> dict:
    """Static sm_90 compile report of every registered Triton kernel config, or why it is missing."""
    try:
        from docqa_fast.tools.hopper_check import check_all, format_table

        reports = check_all()
    except Exception as exc:  # a broken toolchain must not lose the timings already taken
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"reports": [r.as_dict() for r in reports], "table": format_table(reports),
            "problems": sum(not r.ok for r in reports)}


def hopper_summary(hopper: dict) -> str:
    """One line, plus a line per config with a problem (the full table goes to summary.md)."""
    if "table" not in hopper:
        return f"Hopper report not produced: {hopper.get('skipped') or hopper.get('error')}"
    lines = [f"Hopper report: {len(hopper['reports'])} kernel configs compiled for sm_90, "
             f"{hopper['problems']} with problems."]
    lines += [f"  {r['name']}: {'; '.join(r['problems'])}" for r in hopper["reports"] if not r["ok"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- tables

def _ms(value: float) -> str:
    return f"{value:.4f}" if value < 1 else f"{value:.2f}"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _check_cell(row: dict, reference: str) -> str:
    """What the cross-check says of a row that ran: against which output, and the outcome."""
    check = row.get("check")
    against = row.get("checked_against")
    versus = "" if against in (None, reference) else f" vs {against}"
    if check == "ok":
        return "ok" + versus
    if check == "mismatch":
        return f"MISMATCH{versus} (max err {row['max_abs_error']:.3g})"
    return check or "-"  # "reference", "stand-in reference", "unchecked"


def _row_cells(row: dict, record: dict) -> list[str]:
    if row["status"] != "ok":
        return [row["provider"], f"{row['status']}: {row['reason']}", "", "", "", "", "", "", ""]
    fraction = row.get("fraction_of_ceiling")
    fraction_text = "n/a" if fraction is None else f"{fraction:.0%}"
    if "meets_target" in row:
        fraction_text += " (meets target)" if row["meets_target"] else f" (below {record['target']:.0%} target)"
    speedup = ", ".join(f"{s:.2f}x vs {peer}" for peer, s in row.get("speedup", {}).items())
    return [row["provider"], _ms(row["p20_ms"]), _ms(row["p50_ms"]), _ms(row["p80_ms"]), f"{row['rate']:.1f}",
            fraction_text, speedup or "-", _mib(row["peak_memory_bytes"]),
            _check_cell(row, record.get("check", {}).get("reference"))]


def _host_cost(counts: dict | None) -> str:
    """A provider's host cost per call, when its family counted it (params["host_syncs"])."""
    if counts is None:
        return "-"
    return f"{counts.get('syncs', 'n/a')} syncs, {counts.get('value_reads', 'n/a')} value reads"


def case_table(record: dict) -> str:
    """Markdown table of one case: a row per provider (skips and errors with their reason); one
    line instead when every provider was skipped, each reason once."""
    if all_skipped(record):
        reasons = {}
        for row in record["providers"]:
            reasons.setdefault(row["reason"], []).append(row["provider"])
        return "Skipped here, no provider can run: " + "; ".join(
            f"{', '.join(names)}: {reason}" for reason, names in reasons.items()) + "."
    header = ["provider", "p20 ms", "p50 ms", "p80 ms", record["metric"], "of ceiling", "speedup (ours)",
              "peak MiB", "check"]
    host = record["params"].get("host_syncs")
    if host is not None:
        header.append("host cost")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in record["providers"]:
        cells = _row_cells(row, record)
        if host is not None:
            cells.append(_host_cost(host.get(row["provider"])))
        lines.append("| " + " | ".join(cells) + " |")
    note = record.get("check", {}).get("note")
    if note:  # the reference gave no output: say what the check column was measured against
        lines += ["", f"Cross-check: {note}."]
    return "\n".join(lines)


def case_heading(record: dict) -> str:
    work = (f"{record['bytes_moved'] / 1e6:.3g} MB moved" if record["bytes_moved"] is not None
            else f"{record['flops'] / 1e12:.3g} TFLOP")
    target = f"; target: ours >= {record['target']:.0%} of the ceiling" if record["target"] else ""
    return f"{record['case']}: {record['description']}, {record['sweep']}={record['params'][record['sweep']]} ({work}{target})"


def ceilings_text(ceilings: dict) -> str:
    if "skipped" in ceilings:
        return f"Device ceilings: skipped ({ceilings['skipped']})."
    return (f"Device ceilings: bf16 matmul {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s "
            f"({'x'.join(map(str, ceilings['matmul_shape']))}), device-to-device copy "
            f"{ceilings['copy_gbps']:.0f} GB/s (bytes read + written).")


# ------------------------------------------------------------------------------- files

def write_json(path: Path, env: dict, ceilings: dict, records: list[dict], hopper: dict, settings: dict) -> None:
    payload = {"environment": env, "settings": settings, "ceilings": ceilings, "cases": records, "hopper": hopper}
    # Written after every case: a process stopped at a time limit must not leave half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    partial.replace(path)


def write_summary(path: Path, env: dict, ceilings: dict, records: list[dict], hopper: dict,
                  settings: dict, plots: list[Path]) -> None:
    load = f"{env['load_average'][0]:.1f}" if env["load_average"] else "n/a"
    lines = [f"# Benchmarks: {env['device']}", "",
             f"torch {env['torch']}, Triton {env['triton']}, Python {env['python']}, "
             f"driver {env['driver'] or 'n/a'}, commit {env['git_commit'] or 'n/a'}, {env['timestamp']}; "
             f"{'quick' if settings['quick'] else 'full'} sizes; {env['cpu_count']} CPU cores, "
             f"load average {load} at the start.", "",
             ceilings_text(ceilings), "", "Backends here:", ""]
    lines += [f"- {name}: {status}" for name, status in env["backends"].items()]
    lines += ["", "Times are p20/p50/p80 over repetitions on rotated random inputs; rates use the median. "
              "Peak MiB is memory the call allocated above its resident inputs (GPU only). Check: the output "
              "against the reference's; \"vs X\" where the reference failed and provider X stood in; "
              "\"unchecked\" where nothing else ran. A provider that fails says so in its row "
              "(error: type and message) and the others still run.", ""]
    for record in records:
        lines += [f"## {case_heading(record)}", "", case_table(record), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})\n" for p in plots]
    lines += ["## Static Hopper (sm_90) compile report", ""]
    lines += [hopper_summary(hopper).replace("\n  ", "\n- ")]
    if "table" in hopper:
        lines += ["", hopper["table"]]
    path.write_text("\n".join(lines) + "\n")


# The x axis of a plot: a sweep's name said in words where it has a common one.
SWEEP_LABELS = {"S": "sequence length S (tokens)"}
OVERVIEW_COLUMNS = 3


def write_plots(out_dir: Path, records: list[dict], ceilings: dict) -> list[Path]:
    """PNG plots of each provider's rate (p50, p20-p80 band) across the swept size, with the
    device ceiling and our target drawn when they are known (GPU runs); a provider keeps its
    colour in every plot of the run. First, per family where two case groups or more have a
    line to draw (a provider measured at two sizes or more), an overview
    (``<family>__overview.png``) with one panel per such group: e.g. attention's TFLOP/s
    against the sequence length per provider, every kind and mode side by side, the picture
    to look at first. Then one plot per case group. A group in which no provider measured
    anything (all skipped or failed) gets no plot and no panel: its table says why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for record in records:
        groups[(record["family"], record["group"])].append(record)
    measured = {key: sorted(members, key=lambda r: r["params"][r["sweep"]]) for key, members in groups.items()
                if any(row["status"] == "ok" for r in members for row in r["providers"])}
    colors = _provider_colors(records, plt.get_cmap("tab20").colors)
    paths = []
    families = dict.fromkeys(family for family, _ in measured)
    for family in families:
        panels = [(group, members) for (f, group), members in measured.items() if f == family and _has_line(members)]
        if len(panels) >= 2:  # one group alone: its own plot is the family's
            paths.append(_write_overview(plt, out_dir, family, panels, ceilings, colors))
    for (family, group), members in measured.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        _draw_group(ax, members, ceilings, colors)
        ax.set_title(f"{family}: {group}\n{members[0]['description']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{family}__{group}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _provider_colors(records: list[dict], palette) -> dict[str, tuple]:
    """One colour per provider name for the whole run, in the order providers first appear."""
    names = dict.fromkeys(row["provider"] for r in records for row in r["providers"])
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _points(members: list[dict], provider: str) -> list[tuple]:
    return [(r["params"][r["sweep"]], row) for r in members for row in r["providers"]
            if row["provider"] == provider and row["status"] == "ok"]


def _has_line(members: list[dict]) -> bool:
    """Whether some provider was measured at two sizes or more of the group."""
    providers = {row["provider"] for r in members for row in r["providers"]}
    return any(len(_points(members, provider)) >= 2 for provider in providers)


def _draw_group(ax, members: list[dict], ceilings: dict, colors: dict) -> None:
    """One group's rates on ``ax``: a line per provider measured, the ceiling and target if known."""
    providers = dict.fromkeys(row["provider"] for r in members for row in r["providers"])
    for provider in providers:
        points = _points(members, provider)
        if not points:
            continue
        xs = [x for x, _ in points]
        ys = [row["rate"] for _, row in points]
        # A slower time is a lower rate: the p80 time gives the band's bottom, p20 its top.
        low = [row["rate"] * row["p50_ms"] / row["p80_ms"] for _, row in points]
        high = [row["rate"] * row["p50_ms"] / row["p20_ms"] for _, row in points]
        color = colors.get(provider)
        ax.plot(xs, ys, marker="o", label=provider, color=color, linewidth=2.2 if "docqa_fast" in provider else 1.4)
        ax.fill_between(xs, low, high, color=color, alpha=0.2)
    ceiling = ceilings.get(CEILING_OF_METRIC[members[0]["metric"]])
    if ceiling:
        ax.axhline(ceiling, color="black", linestyle="--", linewidth=1, label="device ceiling")
        for target in {r["target"] for r in members if r["target"]}:
            ax.axhline(target * ceiling, color="gray", linestyle=":", linewidth=1, label=f"{target:.0%} target")
    ax.set_ylim(bottom=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["params"][r["sweep"]] for r in members])
    ax.set_xticklabels([_size_text(r["params"][r["sweep"]]) for r in members])
    ax.set_xlabel(SWEEP_LABELS.get(members[0]["sweep"], members[0]["sweep"]))
    ax.set_ylabel(f"{members[0]['metric']} (median)")
    ax.grid(True, alpha=0.3)


def _size_text(value) -> str:
    """A tick label: 16384 -> "16K", 4800 -> "4800" (only exact multiples of 1024 shortened)."""
    if isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        return f"{value // 1024}K"
    return str(value)


def _write_overview(plt, out_dir: Path, family: str, panels: list[tuple], ceilings: dict, colors: dict) -> Path:
    """A grid of the family's groups (``OVERVIEW_COLUMNS`` across), one legend for all of them."""
    columns = min(OVERVIEW_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows + 0.9), squeeze=False)
    for ax, (group, members) in zip(axes.flat, panels):
        _draw_group(ax, members, ceilings, colors)
        ax.set_title(group, fontsize=9)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat[:len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    metric = panels[0][1][0]["metric"]
    sweeps = {members[0]["sweep"] for _, members in panels}
    against = SWEEP_LABELS.get(*sweeps, *sweeps) if len(sweeps) == 1 else "the swept size"
    fig.suptitle(f"{family}: {metric} against {against}, per provider (median, band p20-p80)", fontsize=11)
    legend_rows = -(-len(handles) // 5)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.035 * legend_rows / rows + 0.01, 1, 0.97))
    path = out_dir / f"{family}__overview.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
