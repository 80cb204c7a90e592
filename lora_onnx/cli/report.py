"""``lora-onnx report merge``: one report (and gate) from the reports of ``batch --shard`` runs."""

from __future__ import annotations

import argparse

from lora_onnx.cli.batch import finish


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="work with batch reports (merge the reports of sharded runs)",
        description="Batch reports: 'merge' joins the JSON reports of 'batch --shard I/N' runs.",
    )
    actions = parser.add_subparsers(dest="report_command", required=True, metavar="ACTION")
    merge = actions.add_parser(
        "merge",
        help="merge shard reports into one; exit code as the whole run's",
        description="Merge JSON reports of one sharded run. Refuses reports of different recipes, "
        "overlapping shards and missing shards (unless --allow-missing). Exit 0 when every model is ok, "
        "1 when some validation disagreed, 2 when some model failed.",
    )
    merge.add_argument("reports", nargs="+", metavar="REPORT.json", help="reports written by batch --report")
    merge.add_argument("-o", "--output", metavar="FILE.json", help="write the merged report as JSON")
    merge.add_argument("--junit", metavar="FILE.xml", help="write the merged report as JUnit XML")
    merge.add_argument(
        "--allow-missing", action="store_true", help="merge even when some shards' reports are missing"
    )
    merge.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from lora_onnx.commands.reports import merge_reports, read_report
    from lora_onnx.model.save import check_report_paths

    check_report_paths([args.output, args.junit], args.reports)  # before any work
    reports = [(path, read_report(path)) for path in args.reports]
    merged = merge_reports(reports, allow_missing=args.allow_missing)
    return finish(merged, args.output, args.junit)
