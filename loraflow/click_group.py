"""The click group both commands use: bad input (a LoraFlowError) becomes `error: ...` on
stderr and exit code 1, never a traceback."""

import sys

import click

from loraflow.errors import LoraFlowError


class ErrorExitGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LoraFlowError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
