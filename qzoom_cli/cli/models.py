"""`qzoom doctor` and `qzoom models list | make-tiny`: the environment and the model cards."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from ..errors import UsageError
from .common import JsonFlag, Quiet, RevisionOpt, Verbose, configure_logging, flag, print_json

models_app = typer.Typer(help="Model cards, downloads, conversion and tiny offline checkpoints.", no_args_is_help=True,
                        rich_markup_mode=None)


def doctor(as_json: JsonFlag = False, verbose: Verbose = False) -> None:
    """Report versions, devices, flash-attention and the Hugging Face cache (offline mode included)."""
    from ..doctor import collect_report

    report = collect_report()
    if as_json:
        print_json(report)
        return
    console = Console()
    console.print(f"[bold]qzoom {report['qzoom']}[/] on Python {report['python']} ({report['platform']})")
    for name, version in report["packages"].items():
        console.print(f"  {name:<16} {version or '-'}")
    verdict = "ok" if report["transformers_ok"] else "[red]NOT SUPPORTED[/]"
    console.print(f"transformers range {report['transformers_supported']}: {verdict}")
    console.print(f"CUDA available: {report['cuda']['available']} (torch built for CUDA "
                  f"{report['cuda']['torch_cuda'] or '-'})")
    for dev in report["devices"]:
        details = ", ".join(f"{k} {v}" for k, v in dev.items() if k not in ("device", "name"))
        console.print(f"  {dev['device']:<8} {dev['name']}" + (f" ({details})" if details else ""))
    console.print(f"flash-attention: {'available' if report['flash_attention'] else 'not installed'}")
    hub = report["hub"]
    console.print(f"hub cache: {hub['cache']}  offline: {hub['offline']}  endpoint: {hub['endpoint']}")


@models_app.command("list", short_help="The model cards, and which are cached.")
def models_list(as_json: JsonFlag = False, verbose: Verbose = False) -> None:
    """List the model cards qzoom ships (hub id, family, default budgets), the default marked *,
    and which are in the Hugging Face cache, with their size on disk."""
    from dataclasses import asdict

    from ..cards import load_cards
    from ..pull import cached_sizes, gigabytes

    cards, cached = load_cards(), cached_sizes()
    if as_json:
        print_json({"models": [{**asdict(card), "cached": card.id in cached, "size_on_disk": cached.get(card.id)}
                               for card in cards]})
        return
    for card in cards:
        mark = "*" if card.default else " "
        where = f"cached {gigabytes(cached[card.id])}" if card.id in cached else "not cached"
        print(f"{mark} {card.id:<34} {card.family:<12} {where:<18} tokens {card.min_visual_tokens}-"
              f"{card.max_visual_tokens}  {card.description}")


@models_app.command("pull", short_help="Download a checkpoint into the cache.")
def models_pull(
    model: Annotated[str, typer.Argument(help="Hub id of the checkpoint (a card's or any supported one).")],
    revision: RevisionOpt = None,
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Download a checkpoint into the Hugging Face cache, with progress (resumes if stopped), so the
    first `ask` starts at once; prints its folder."""
    from ..pull import gigabytes, pull

    configure_logging(verbose, quiet)

    def on_plan(plan) -> None:
        if not quiet:
            print(f"qzoom: {model}: {plan.files} files, {gigabytes(plan.total_bytes)} "
                  f"({gigabytes(plan.download_bytes)} to download)", file=sys.stderr)

    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    folder = pull(model, revision, on_plan)
    if as_json:
        print_json({"model": model, "revision": revision, "path": str(folder)})
    else:
        print(folder)


@models_app.command("make-tiny", short_help="A tiny random checkpoint, for tests.")
def models_make_tiny(
    directory: Annotated[str, typer.Argument(help="Where to write the checkpoint.")],
    family: Annotated[str, typer.Option(help="Model family: qwen2_5_vl, qwen3_vl, qwen3_5, llava.")] = "qwen2_5_vl",
    moe: Annotated[bool, flag(help="Qwen3-VL or Qwen3.5 with mixture-of-experts layers (qwen3_vl_moe, "
                                   "qwen3_5_moe).")] = False,
    thinking: Annotated[bool, flag(help="Qwen3-VL with a Thinking checkpoint's chat template.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    layers: Annotated[int, typer.Option(help="Decoder layers (Qwen3.5: every second one full-attention).")] = 4,
    verbose: Verbose = False,
) -> None:
    """Write a tiny random checkpoint (offline) that loads like a real one: for tests and CI."""
    from ..testing import make_tiny

    configure_logging(verbose, quiet=True)
    if moe and family not in ("qwen3_vl", "qwen3_5"):
        raise UsageError("--moe is for --family qwen3_vl or qwen3_5")
    print(make_tiny(directory, family=f"{family}_moe" if moe else family, seed=seed, num_layers=layers,
                    thinking=thinking))




@models_app.command("convert", short_help="An original LLaVA-1.5 checkpoint to llava-hf.")
def convert_command(
    source: Annotated[str, typer.Argument(help="An original-layout LLaVA-1.5 checkpoint folder (LlavaLlamaForCausalLM, "
                                               "e.g. an SD-RPN region-head release).")],
    destination: Annotated[str, typer.Argument(help="Folder to write the llava-hf checkpoint (and adapter) into.")],
    vision_tower: Annotated[str | None, typer.Option(help="CLIP checkpoint the source names in mm_vision_tower "
                                                          "(hub id or folder) [default: the source's].")] = None,
    force: Annotated[bool, flag(help="Write into a folder that is not empty.")] = False,
    as_json: JsonFlag = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Convert an original-layout LLaVA-1.5 checkpoint to llava-hf; its SD-RPN region head, if it has
    one, becomes a qzoom adapter in the same folder (`--model DESTINATION` then zooms with it)."""
    from pathlib import Path

    from ..doctor import check_transformers
    from ..outputs import check_output_folder

    target = Path(destination)
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"{destination} is not empty: --force to write into it, or give another folder")
    check_output_folder(target)
    check_transformers()
    from ..convert import convert_llava

    configure_logging(verbose, quiet)
    report = convert_llava(source, target, vision_tower)
    if as_json:
        print_json(report)
    else:
        print(target)
