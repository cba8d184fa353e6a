"""`inhouse tools ...`: try the model's built-in tools by hand, as the server would run them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from inhouse.cli.common import cli_errors, err, out

tools_app = typer.Typer(help="The built-in tools (python sandbox) run by hand.",
                        no_args_is_help=True)


@tools_app.command()
@cli_errors
def python(
    code: Annotated[str | None, typer.Option(help="Python source to run ('-' reads stdin).")] = None,
    file: Annotated[Path | None, typer.Option(help="A file of Python source to run.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds the code may run.")] = 120.0,
    memory_mib: Annotated[int, typer.Option(help="Address space limit, MiB.")] = 1024,
) -> None:
    """Run code in the python tool's sandbox (no network, no host files, no new processes,
    a private /mnt/data) and print what it printed. Exit status 1 if it raised or was stopped."""
    from inhouse.errors import InhouseError
    from inhouse.tools.python import PythonSession
    from inhouse.tools.sandbox import SandboxLimits, probe

    if (code is None) == (file is None):
        raise InhouseError("give exactly one of --code or --file")
    if file is not None:
        if not file.is_file():
            raise InhouseError(f"no such file: {file}")
        source = file.read_text()
    else:
        source = sys.stdin.read() if code == "-" else code
    probe()
    session = PythonSession(SandboxLimits(wall_seconds=timeout, memory_bytes=memory_mib << 20))
    try:
        result = session.run(source)
    finally:
        session.close()
    text = result.text()
    out.print(text, markup=False, highlight=False, soft_wrap=True,
              end="" if text.endswith("\n") else "\n")
    if result.error or result.restarted:
        err.print("the code raised" if result.error else "the code was stopped", markup=False)
        raise typer.Exit(1)
