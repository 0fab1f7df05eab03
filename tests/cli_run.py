"""Running the `fatesim` command line inside a test, as a user would (exit status, stdout, stderr)."""

from __future__ import annotations

from sim.cli import main


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `fatesim ARGV`; `capsys` is pytest's fixture."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
