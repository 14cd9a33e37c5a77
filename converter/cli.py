"""`loraflow-convert`: PEFT adapters + gate -> LoRA-Flow GGUF (`flow`), Hugging Face model -> GGUF,
quantized if asked (`base`), a summary of any of these files (`inspect`), and one adapter of a
flow file back out as a stock llama.cpp LoRA (`export-lora`)."""

from __future__ import annotations

import logging

import click

from loraflow.converter.base import BASE_OUTTYPES
from loraflow.converter.export_lora import EXPORT_OUTTYPES
from loraflow.converter.flow import DEFAULT_OUTTYPE, OUTTYPES
from loraflow.click_group import ErrorExitGroup


def _parse_adapter(ctx, param, values):
    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r}: expected NAME=PEFT_DIR", ctx=ctx, param=param)
        pairs.append((name, path))
    return pairs


def _set_verbose(ctx, param, verbose):
    if verbose:
        logging.basicConfig(format="%(message)s")
        logging.getLogger().setLevel(logging.INFO)


# before or after the subcommand: `loraflow-convert -v flow ...` and `loraflow-convert flow ... -v`
_verbose = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbose,
                        help="Show the converter's progress messages.")


@click.group(cls=ErrorExitGroup)
@_verbose
@click.version_option(package_name="loraflow")
def main():
    """Convert adapters and base models to GGUF for the LoRA-Flow runtime."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


@main.command()
@_verbose
@click.option("--base", required=True, type=click.Path(exists=True),
              help="The base model: its GGUF file or its Hugging Face folder.")
@click.option("--adapter", "adapters", multiple=True, required=True, callback=_parse_adapter,
              metavar="NAME=PEFT_DIR", help="A PEFT LoRA folder; repeat in slot order (the gate's order).")
@click.option("--gate", required=True, type=click.Path(exists=True),
              help="Gate checkpoint: our gate.safetensors (or its folder) or the paper's torch file.")
@click.option("-o", "--output", required=True, type=click.Path(), help="The flow GGUF to write.")
@click.option("--outtype", type=click.Choice(list(OUTTYPES)), default=DEFAULT_OUTTYPE, show_default=True,
              help="Type of the LoRA tensors (gates are always F32); f32 keeps the PEFT values exactly.")
@click.option("--temperature", type=float, default=None,
              help="Gate temperature T; default: the checkpoint's, else 1.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def flow(base, adapters, gate, output, outtype, temperature, force):
    """Write one LoRA-Flow GGUF from k PEFT adapters and a gate checkpoint."""
    from loraflow.converter.flow import convert_flow

    out = convert_flow(base, adapters, gate, output, outtype=outtype, temperature=temperature, force=force)
    click.echo(str(out))


@main.command()
@_verbose
@click.argument("hf_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(), help="The GGUF to write.")
@click.option("--outtype", type=click.Choice(BASE_OUTTYPES), default="f16", show_default=True,
              help="f32/f16/bf16/q8_0 straight from llama.cpp's converter; q4_0, q4_1 and the k-quants "
                   "through a temporary GGUF in the model's own float type and llama.cpp's quantize API.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="Do not show the converter's output and progress.")
def base(hf_dir, output, outtype, force, quiet):
    """Convert a Hugging Face base model to GGUF with llama.cpp's convert_hf_to_gguf.py (and quantize it)."""
    from loraflow.converter.base import convert_base

    out = convert_base(hf_dir, output, outtype=outtype, force=force, progress=not quiet)
    click.echo(str(out))


@main.command()
@_verbose
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--verify", is_flag=True,
              help="Only check the file's digest (loraflow.digest) against its contents, without loading a "
                   "model: 'digest ok', or an error and exit code 1 on a mismatch or a file without one.")
def inspect(file, as_json, verify):
    """Summarise a LoRA-Flow file, a stock llama.cpp LoRA or a base model GGUF."""
    import json

    from loraflow.converter.summary import format_summary, inspect_gguf, verify_digest

    if verify:
        digest = verify_digest(file)
        click.echo(json.dumps({"file": file, "digest": digest, "ok": True}) if as_json
                   else f"{file}: digest ok ({digest})")
        return
    data = inspect_gguf(file)
    click.echo(json.dumps(data, indent=2) if as_json else format_summary(data))


@main.command("export-lora")
@_verbose
@click.argument("flow_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--adapter", required=True, metavar="NAME", help="The adapter to export (a name in the flow file).")
@click.option("-o", "--output", required=True, type=click.Path(), help="The LoRA GGUF to write.")
@click.option("--outtype", type=click.Choice(list(EXPORT_OUTTYPES)), default="f32", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def export_lora_cmd(flow_file, adapter, output, outtype, force):
    """Write one adapter of a LoRA-Flow file as a stock llama.cpp LoRA GGUF (llama_cpp.Llama(lora_path=...))."""
    from loraflow.converter.export_lora import export_lora

    out = export_lora(flow_file, adapter, output, outtype=outtype, force=force)
    click.echo(str(out))
