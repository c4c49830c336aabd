"""The `edgeres` command: parse, call one library function, render."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgeres.errors import EdgeresError

app = typer.Typer(
    name="edgeres",
    help="Quantized ResNet / Wide ResNet to ONNX Runtime (CPU) and TensorRT (Jetson): "
    "latency, size and top-1 error per target.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ModelArg = Annotated[str, typer.Argument(help="Model name (see `edgeres models`), e.g. resnet20, wrn-16-4; "
                                         "a weights tag may follow: resnet20.cifar10_akamaster")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", "-w", help="Checkpoint: edgeres, state_dict "
                                                 "or {'state_dict': ...} research layout")]
DataOpt = Annotated[str | None, typer.Option("--data", "-d", help="cifar10, cifar100, synthetic, or a PATH "
                                             "(CIFAR folder or ImageFolder tree); default: the model's data set")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout")]
NumClassesOpt = Annotated[int | None, typer.Option("--num-classes", help="Classes; differing from the "
                                                   "checkpoint replaces the classifier (transfer learning)")]
WidthOpt = Annotated[int | None, typer.Option("--width", help="WRN width k (overrides the K in wrn-D-K)")]
ShortcutOpt = Annotated[str | None, typer.Option("--shortcut", help="CIFAR ResNet shortcut: A (zero-pad) or "
                                                 "B (1x1 projection)")]
InputSizeOpt = Annotated[int | None, typer.Option("--input-size", help="Input resolution in pixels")]
DropoutOpt = Annotated[float | None, typer.Option("--dropout", help="WRN dropout between convolutions")]


def _arch(width: int | None, shortcut: str | None, input_size: int | None, dropout: float | None) -> dict:
    return {"width": width, "shortcut": shortcut, "input_size": input_size, "dropout": dropout}


@app.command("models")
def models_cmd(
    pattern: Annotated[str, typer.Argument(help="Shell pattern, e.g. 'resnet*'")] = "*",
    as_json: JsonOpt = False,
) -> None:
    """List models with parameters and MACs at their default input size."""
    from edgeres import api
    from edgeres.report import render

    render(api.list_models(pattern), as_json=as_json)


@app.command("eval")
def eval_cmd(
    model: ModelArg,
    weights: WeightsOpt = None,
    data: DataOpt = None,
    split: Annotated[str, typer.Option(help="train or test")] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 256,
    limit: Annotated[int | None, typer.Option(help="Evaluate a class-balanced subset of N images")] = None,
    num_classes: NumClassesOpt = None,
    width: WidthOpt = None,
    shortcut: ShortcutOpt = None,
    input_size: InputSizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-1 accuracy and error of MODEL on the full test split."""
    from edgeres import api
    from edgeres.report import render

    render(api.eval_model(model, weights=weights, data_spec=data, split=split, batch_size=batch_size,
                          num_classes=num_classes, limit=limit, **_arch(width, shortcut, input_size, None)),
           as_json=as_json)


@app.command("train")
def train_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: last.pt, best.pt, history.json")],
    data: DataOpt = None,
    epochs: Annotated[int, typer.Option(help="Epochs (paper: 164 at batch 128 = 64k iterations)")] = 164,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Per process")] = 128,
    lr: float = 0.1,
    weight_decay: Annotated[float | None, typer.Option(help="Default: 1e-4 ResNet, 5e-4 WRN")] = None,
    schedule: Annotated[str, typer.Option(help="step (/10 at 50% and 75%) or cosine")] = "step",
    seed: int = 0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt")] = False,
    subset: Annotated[int | None, typer.Option(help="Train on a class-balanced subset of N images")] = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    width: WidthOpt = None,
    shortcut: ShortcutOpt = None,
    dropout: DropoutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train MODEL with the paper recipe (or fine-tune from --weights); checkpoints every epoch."""
    from edgeres import api
    from edgeres.report import render
    from edgeres.train import TrainConfig

    if schedule not in ("step", "cosine"):
        raise typer.BadParameter("must be step or cosine", param_hint="--schedule")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         schedule=schedule, seed=seed)
    render(api.train(model, data_spec=data, out=out, config=config, weights=weights, num_classes=num_classes,
                     resume=resume, subset=subset, **_arch(width, shortcut, None, dropout)), as_json=as_json)


def main() -> None:
    """Console entry point: user errors become one red line and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        app()
    except EdgeresError as exc:
        if os.environ.get("EDGERES_DEBUG"):
            raise
        from edgeres.progress import console

        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
