"""``wan plugins``: what is installed, what can run here, and what is wrong.

Exit status: 0 when every plugin loaded and every name is unique; 1 when a plugin is broken or
two plugins register the same name (the listing is printed in full first, then one ``error:``
line on stderr), so CI can run ``wan plugins`` as a health check.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from typing import Any

import click

from wan_cli.errors import WanCliError


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def render(info: dict[str, Any], *, verbose: bool = False) -> str:
    """The human listing of :meth:`PluginManager.describe`, grouped by concern."""
    from wan_kernel.plugins import install_hints

    out: list[str] = []
    for concern, impls in info["concerns"].items():
        out.append(click.style(concern, bold=True))
        if not impls:
            hints = install_hints(concern)
            hint = f"; install {' or '.join(hints)}" if hints else ""
            out.append(f"  (none installed{hint})")
            continue
        rows = [["name", "aliases", "available", "from", "description"]]
        for impl in impls:
            available = "yes" if impl["available"] else "no"
            source = f"{impl['distribution']} {impl['version']}".strip()
            rows.append([impl["name"], ", ".join(impl["aliases"]) or "-", available, source, impl["description"]])
        reasons = {i + 1: impl["reason"] for i, impl in enumerate(impls) if not impl["available"]}
        for i, line in enumerate(_table(rows)):
            out.append(line)
            if i in reasons:  # why not, wrapped under its row
                out.extend(
                    textwrap.wrap(
                        f"not available: {reasons[i] or 'no reason given'}",
                        width=max(60, shutil.get_terminal_size((100, 24)).columns - 1),
                        initial_indent="      ",
                        subsequent_indent="        ",
                        break_on_hyphens=False,
                    )
                )
    out.append("")
    out.append(click.style(f"plugins (entry-point group {info['entry_point_group']!r})", bold=True))
    rows = [["distribution", "version", "entry point", "provides"]]
    for plugin in info["plugins"]:
        if plugin["broken"]:
            provides = "BROKEN"
        else:
            counts = [f"{len(v)} {k}" for k, v in plugin["implementations"].items()]
            provides = ", ".join(counts) or "nothing"
        rows.append(
            [plugin["distribution"], plugin["version"] or "-", f"{plugin['plugin']} = {plugin['module']}", provides]
        )
    out.extend(_table(rows) if len(rows) > 1 else ["  (none)"])
    for skipped in info["skipped"]:
        out.append(f"  skipped {skipped['distribution']} ({skipped['plugin']}): {skipped['reason']}")
    if info["broken"]:
        out.append("")
        out.append(click.style("broken plugins", bold=True, fg="red"))
        for broken in info["broken"]:
            label = " ".join(filter(None, [broken["distribution"], broken["version"]]))
            out.append(f"  {label} (entry point {broken['plugin']}): {broken['error']}")
            if verbose and broken.get("traceback"):
                out.extend("    " + line for line in broken["traceback"].rstrip().splitlines())
        if not verbose:
            out.append("  (run `wan plugins --verbose` for the tracebacks)")
    if info["duplicates"]:
        out.append("")
        out.append(click.style("duplicate names", bold=True, fg="red"))
        out.extend(f"  {dup['message']}" for dup in info["duplicates"])
    return "\n".join(out)


def problems(info: dict[str, Any]) -> str | None:
    """The one-line summary of what makes ``wan plugins`` exit 1, or ``None``."""
    parts = []
    if info["broken"]:
        names = ", ".join(b["distribution"] for b in info["broken"])
        parts.append(f"{len(info['broken'])} plugin(s) failed to load ({names})")
    if info["duplicates"]:
        names = ", ".join(f"{d['concern']} {d['name']!r}" for d in info["duplicates"])
        parts.append(f"{len(info['duplicates'])} name(s) registered twice ({names})")
    return "; ".join(parts) if parts else None


@click.command("plugins", short_help="List installed plugins, their implementations and availability.")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show the tracebacks of broken plugins.")
def plugins(as_json: bool, verbose: bool) -> None:
    """List installed plugins: implementations per concern, their availability, and problems.

    Exits 1 (after the full listing) when a plugin is broken or a name is registered twice.
    WAN_LOAD_PLUGINS / WAN_DISABLE_PLUGINS (comma-separated plugin or distribution names)
    choose which plugins are loaded.
    """
    from wan_kernel.plugins import PluginManager

    info = PluginManager().describe(tracebacks=verbose)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(render(info, verbose=verbose))
    problem = problems(info)
    if problem:
        raise WanCliError(problem)
