"""The `tileflow` command line."""

from __future__ import annotations

import json
import sys

import click

from .pipeline import available_passes


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tileflow")
def main() -> None:
    """tileflow: a torch.compile backend and ahead-of-time compiler for LLM serving."""


@main.command("passes")
def passes_command() -> None:
    """List the passes that `options={"passes": [...]}` can name."""
    for name in available_passes():
        click.echo(name)


@main.command("report")
@click.argument("report_json", type=click.Path(exists=True, dir_okay=False))
def report_command(report_json: str) -> None:
    """Print a report.json written by `debug_dir` as tables."""
    from .report import Report

    try:
        report = Report.from_json(open(report_json).read())
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        click.echo(f"error: {report_json} is not a tileflow report: {exc}", err=True)
        sys.exit(2)
    click.echo(str(report))


if __name__ == "__main__":
    main()
