"""The `fatesim` command line: one root group whose subcommands live beside the code they drive.

Subcommands are imported only when invoked, so `fatesim replay` never pays for importing torch, and
each package owns its own commands (traces/cli.py, sim/replay_cli.py, realrun/cli.py, ...). A
`UserError` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import click

from traces.errors import UserError

# name -> (module, attribute, one-line help). The help is here so `fatesim --help` imports nothing.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "trace": ("traces.cli", "trace", "Record, import and inspect routing traces."),
    "replay": ("sim.replay_cli", "replay", "Replay a trace under a policy, budget and hardware profile."),
    "compare": ("sim.compare", "main", "Replay one trace under several policies; one table with speedups."),
    "policies": ("sim.replay_cli", "policies", "List the policy presets and their components."),
    "profiles": ("sim.replay_cli", "profiles", "List the hardware profiles with provenance."),
    "models": ("sim.replay_cli", "models", "List the built-in model specs (shapes, bytes, MoE layers)."),
    "analyze": ("sim.analysis.cli", "analyze", "Routing analyses: local routing consistency, predictors."),
    "train-estimator": ("sim.analysis.cli", "train_estimator", "Train the learned next-layer expert estimator."),
    "sweep": ("sim.analysis.cli", "sweep", "Replay the cartesian product of a grid of configurations."),
    "plot": ("sim.analysis.cli", "plot", "Plot sweep results and timelines to PNG files."),
    "plan": ("sim.analysis.cli", "plan", "Capacity planning: smallest budget for a target, or best policy."),
    "realrun": ("realrun.cli", "realrun", "Run a model for real with offloaded experts under a policy."),
    "calibrate": ("calibration.cli", "calibrate", "Measure this machine and write a hardware profile."),
    "validate": ("calibration.cli", "validate", "Compare the simulator with realrun on the same runs."),
    "accuracy": ("calibration.cli", "accuracy", "Accuracy cost of the lossy options (INT4, INT2, speculation)."),
    "reproduce": ("sim.reproduce", "reproduce", "Reproduce a paper's table (fate, speculate, lrc) beside the paper's."),
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(module_name), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="fatesim")
def cli() -> None:
    """fatesim: simulate and run MoE inference with experts offloaded from GPU to host RAM or SSD."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `fatesim` console script."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as error:
        click.echo(f"fatesim: error: {error}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("fatesim: aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(2 if error.exit_code in (1, 2) else error.exit_code)
    except KeyboardInterrupt:
        click.echo("fatesim: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # `python -m sim.cli ...` runs this tree's code (what `make bench` times)
    main()
