"""``python -m benchmarks``: run the cases, print a table each, write results.json, summary.md, plots."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from . import harness, report


# Ignored by git (.gitignore): where a run writes unless --out says otherwise.
LOCAL_RESULTS = Path(__file__).resolve().parent / "results" / "local"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true",
                       help="small sizes and few repetitions, a smoke run (the default without a GPU; on a CPU "
                            "the Triton and torch.compile rows are left out): every case in a few minutes on a "
                            "2-core CPU (measured: 2 minutes of CPU time; 3.6-4.3 minutes of wall time with the "
                            "cores shared with other work), longer on a busy machine; --filter picks cases")
    sizes.add_argument("--full", action="store_true",
                       help="the full workload sizes even without a GPU (the default there is --quick: full "
                            "sizes need tens of GB and hours on a CPU)")
    parser.add_argument("--filter", metavar="SUBSTR", help="only cases whose id (family/name) contains SUBSTR "
                                                         "(several: SUBSTR,SUBSTR,...)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder (default: benchmarks/results/local/<device-slug>/, which git "
                             "ignores; results to commit go to --out benchmarks/results/<device-slug>)")
    report_choice = parser.add_mutually_exclusive_group()
    report_choice.add_argument("--hopper-report", action="store_true",
                               help="add the static sm_90 compile report of the Triton kernels to a --quick run "
                                    "(on a CPU: minutes for the configs whose source changed since the last one)")
    report_choice.add_argument("--no-hopper-report", action="store_true",
                               help="leave the static sm_90 compile report out of a run with the full sizes")
    parser.add_argument("--list", action="store_true",
                        help="list the selected cases and their providers (those that would be skipped here "
                             "marked, with the reason), then exit")
    return parser.parse_args(argv)


def list_cases(cases, device, quick: bool = False) -> str:
    """A line per case, its providers that would not run on ``device`` (at quick sizes when
    ``quick``) starred; then each starred provider once with the reason (the same for every case
    it is in)."""
    skipped = {}
    lines = []
    for case in cases:
        names = []
        for provider in case.providers:
            reason = harness.skip_reason(provider, device, quick)
            if reason is not None:
                skipped.setdefault(provider.name, reason)
            names.append(provider.name + ("*" if reason is not None else ""))
        lines.append(f"{case.id}: {', '.join(names)}")
    if skipped:
        lines += ["", f"* skipped on this machine ({device.type}{', quick sizes' if quick else ''}):"]
        lines += [f"  {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.quick and not args.full and harness.default_device().type == "cpu":
        print("no CUDA device: running the --quick sizes (pass --full to force the workload sizes)")
        args.quick = True
    cases = harness.collect_cases(quick=args.quick, filter=args.filter)
    if not cases:
        print(f"no benchmark case matches --filter {args.filter!r}", file=sys.stderr)
        return 2
    if args.list:
        print(list_cases(cases, harness.default_device(), args.quick))
        return 0

    device = harness.default_device()
    env = report.environment(device)
    # A run leaves the checkout clean unless asked: committed results (a GPU run worth keeping)
    # are written with --out benchmarks/results/<device-slug>.
    out_dir = args.out or LOCAL_RESULTS / env["device_slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{env['device']} | torch {env['torch']} | Triton {env['triton']} | {len(cases)} cases -> {out_dir}")
    for name, status in env["backends"].items():
        print(f"  backend {name}: {status}")

    load = env["load_average"]
    if device.type == "cpu" and load and load[0] > 0.75:
        # On a few cores, one busy neighbour stalls every multi-threaded (OpenMP) op for whole
        # scheduler slices: peers' times can grow 10-100x, so say so next to the numbers.
        print(f"warning: load average {load[0]:.1f} before starting: other work shares these "
              f"{env['cpu_count']} cores, CPU timings will be noisy and inflated")
    ceilings = harness.measure_ceilings(device)
    print(report.ceilings_text(ceilings))

    settings = {"quick": args.quick, "filter": args.filter, "quantiles": list(harness.QUANTILES),
                "timing": ("triton.testing.do_bench, L2 flushed, ms" if device.type == "cuda"
                           else "time.perf_counter per call, ms")}
    started, started_cpu = time.perf_counter(), time.process_time()
    records = []
    said = {}  # the line of a case nothing can run -> the first case that printed it
    # disable=None: a bar on a terminal, none in logs (the tables still print as cases finish).
    with tqdm(total=sum(len(c.providers) for c in cases), unit="provider", disable=None) as progress:
        for case in cases:
            progress.set_description(case.id)
            case_started, case_cpu = time.perf_counter(), time.process_time()
            record = harness.run_case(case, device, args.quick, on_provider_done=lambda _: progress.update())
            # Set-up and checks included. The CPU time (this process's threads; not the compiler
            # processes torch.compile starts) says what the case costs on a machine shared with
            # other work, where the wall time mostly says how busy it was.
            record["wall_s"] = round(time.perf_counter() - case_started, 2)
            record["cpu_s"] = round(time.process_time() - case_cpu, 2)
            harness.add_ceiling_fractions(record, ceilings)
            records.append(record)
            # Rewritten after every case: a run stopped at a time limit (make gpu) keeps what it measured.
            report.write_json(out_dir / "results.json", env, ceilings, records,
                              {"skipped": "the run had not finished its cases"}, settings)
            table = report.case_table(record)
            if harness.all_skipped(record):
                # Each reason once: on a CPU, a dozen attention cases share one long line of them.
                first = said.setdefault(table, case.id)
                table = table if first == case.id else f"Skipped here, as {first}."
            progress.write(f"\n{report.case_heading(record)}\n{table}")
    print(f"timed {len(cases)} cases in {time.perf_counter() - started:.0f} s "
          f"({time.process_time() - started_cpu:.0f} s of CPU time)")

    # After the timings, so its compiler processes never share the CPU with a timed call.
    # The report compiles every Triton config for sm_90 (cached by source): a quick run leaves it
    # to make hopper-report and the tests unless asked.
    if args.no_hopper_report or (args.quick and not args.hopper_report):
        hopper = {"skipped": "--no-hopper-report" if args.no_hopper_report else "--quick (add --hopper-report)"}
    else:
        print("static Hopper (sm_90) compile report of the Triton kernels ...")
        hopper = report.hopper_report()
        print(report.hopper_summary(hopper))

    plots = report.write_plots(out_dir, records, ceilings)
    report.write_json(out_dir / "results.json", env, ceilings, records, hopper, settings)
    report.write_summary(out_dir / "summary.md", env, ceilings, records, hopper, settings, plots)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'summary.md'} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
