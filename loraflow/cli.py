"""The `loraflow` command: it only assembles the commands each part of the project defines next to
what they drive (runtime/cli.py: demo, generate, chat, serve, trace; gate_training/cli.py:
train-gate, eval; the converter has its own, `loraflow-convert`). They are named here, not
imported: a command's module loads when it runs (or for --help), so this core package imports
nothing above it and `loraflow --help` needs neither torch nor llama_cpp. Bad input becomes a
message and exit code 1, never a traceback."""

from __future__ import annotations

import importlib

import click

from loraflow.click_group import ErrorExitGroup

# command name -> the module that defines it (in its COMMANDS)
COMMANDS = {
    "demo": "loraflow.runtime.cli",
    "generate": "loraflow.runtime.cli",
    "chat": "loraflow.runtime.cli",
    "serve": "loraflow.runtime.cli",
    "trace": "loraflow.runtime.cli",
    "train-gate": "loraflow.gate_training.cli",
    "eval": "loraflow.gate_training.cli",
}


class AssemblingGroup(ErrorExitGroup):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return next(c for c in importlib.import_module(COMMANDS[name]).COMMANDS if c.name == name)


@click.group(cls=AssemblingGroup)
@click.version_option(package_name="loraflow")
def main():
    """LoRA-Flow: fuse several LoRAs with per-token, per-layer gates, on a quantized model."""
