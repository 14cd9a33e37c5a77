"""The `loraflow` command. Subcommands live next to what they drive; bad input becomes a
message and exit code 1, never a traceback."""

from __future__ import annotations

import click

from loraflow.click_group import ErrorExitGroup


@click.group(cls=ErrorExitGroup)
@click.version_option(package_name="loraflow")
def main():
    """LoRA-Flow: fuse several LoRAs with per-token, per-layer gates, on a quantized model."""


@main.command()
@click.option("--prompt", "-p", default=None, help="the question  [default: a Spanish word problem of the test set]")
@click.option("--flow", "-f", type=click.Path(dir_okay=False), default=None,
              help="flow file  [default: the compose adapter made by recipes/compose]")
@click.option("--max-tokens", default=40, show_default=True)
@click.option("--threads", default=2, show_default=True)
def demo(prompt, flow, max_tokens, threads):
    """A Spanish LoRA and a math LoRA fused by LoRA-Flow gates on the default model (SmolLM2-135M-Instruct
    Q4_1): the answer, the gates token by token, and the baselines."""
    from loraflow.demo import DEFAULT_PROMPT, run_demo

    run_demo(prompt=prompt or DEFAULT_PROMPT, max_tokens=max_tokens, threads=threads, flow=flow)


# generate, chat, serve, trace (loraflow/cli_runtime.py)
from loraflow.cli_runtime import COMMANDS as _RUNTIME_COMMANDS  # noqa: E402

for _command in _RUNTIME_COMMANDS:
    main.add_command(_command)

# train-gate, eval (loraflow/cli_train.py)
from loraflow.cli_train import COMMANDS as _TRAIN_COMMANDS  # noqa: E402

for _command in _TRAIN_COMMANDS:
    main.add_command(_command)
