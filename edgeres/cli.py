"""The `edgeres` command: parse, call one library function, render."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
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

ModelArg = Annotated[str, typer.Argument(help="Model name (see `edgeres models`), e.g. resnet20, wrn-16-4; a "
                                         "weights tag may follow: resnet20.cifar10_akamaster, resnet18.imagenet1k_v1")]
WeightsOpt = Annotated[str | None, typer.Option("--weights", "-w", help="Checkpoint PATH or http(s) URL: edgeres, "
                                                "state_dict or {'state_dict': ...} research layout")]
SkipBadOpt = Annotated[bool, typer.Option("--skip-bad-images", help="Skip undecodable image files (counted in the "
                                          "report) instead of stopping at the first")]
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
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Run without trained weights (latency/memory "
                                             "work); every row then says its top-1 error means nothing")]


def _no_weight_conflict(model: str | None, weights: str | None, random_init: bool) -> None:
    """--random-init with weights is a usage conflict (exit 2); the library checks the same for API callers."""
    tagged = bool(model) and "." in model and "/" not in model
    if random_init and (weights is not None or tagged):
        raise typer.BadParameter("--random-init contradicts --weights or a weights tag; pass one of them",
                                 param_hint="--random-init")


def _one_precision(int8: bool, fp16: bool) -> None:
    """--int8 with --fp16 is a usage conflict (exit 2); the library checks the same for API callers."""
    if int8 and fp16:
        raise typer.BadParameter("pass --int8 or --fp16, not both", param_hint="--int8/--fp16")


@contextlib.contextmanager
def _library_output_to_stderr() -> Iterator[None]:
    """Libraries that print (NNCF's progress bars and logger) write to stderr, so stdout stays JSON/table only."""
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's logger binds sys.stdout at import, inside this block
        yield


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
    random_init: RandomInitOpt = False,
    skip_bad_images: SkipBadOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Top-1 accuracy and error of MODEL, or of an artifact (model.onnx, model.xml, model.engine) on its own."""
    from edgeres import api
    from edgeres.report import render

    _no_weight_conflict(model, weights, random_init)
    with _library_output_to_stderr():
        result = api.eval_model(model, weights=weights, data_spec=data, split=split, batch_size=batch_size,
                                num_classes=num_classes, limit=limit, random_init=random_init,
                                skip_bad_images=skip_bad_images,
                                **_arch(width, shortcut, input_size, None))
    render(result, as_json=as_json)


@app.command("train")
def train_cmd(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: last.pt, best.pt, history.json (new, empty "
                                      "or an edgeres run; never a folder of yours)")],
    data: DataOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs [default: 164 (paper: 64k iterations at batch 128); "
                                               "15 fine-tuning pretrained weights]")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Per process [default: 128; 64 "
                                                   "fine-tuning]")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate [default: 0.1; 0.01 fine-tuning]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Default: 1e-4 ResNet, 5e-4 WRN")] = None,
    schedule: Annotated[str | None, typer.Option(help="step (/10 at 50% and 75%), cosine, or constant (no decay) "
                                                 "[default: step; cosine fine-tuning]")] = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum")] = 0.9,
    seed: int = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N; default: cuda when available")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/last.pt")] = False,
    subset: Annotated[int | None, typer.Option(help="Train on a class-balanced subset of N images")] = None,
    weights: WeightsOpt = None,
    num_classes: NumClassesOpt = None,
    width: WidthOpt = None,
    shortcut: ShortcutOpt = None,
    dropout: DropoutOpt = None,
    input_size: InputSizeOpt = None,
    skip_bad_images: SkipBadOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train MODEL with the paper recipe, or fine-tune pretrained weights (MODEL.TAG or --weights) with the
    fine-tuning recipe (lower lr, cosine; 224 px models train on random-resized crops); checkpoints every epoch."""
    from edgeres import api
    from edgeres.report import render

    if schedule is not None and schedule not in api.SCHEDULES:
        raise typer.BadParameter(f"must be one of {', '.join(api.SCHEDULES)}", param_hint="--schedule")
    config = api.train_recipe(model, weights, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                              weight_decay=weight_decay, schedule=schedule, seed=seed, device=device)
    with _library_output_to_stderr():
        result = api.train(model, data_spec=data, out=out, config=config, weights=weights, num_classes=num_classes,
                           resume=resume, subset=subset, skip_bad_images=skip_bad_images,
                           **_arch(width, shortcut, input_size, dropout))
    render(result, as_json=as_json)


TargetOpt = Annotated[str, typer.Option("--target", "-t", help="Target profile (see `edgeres targets`): cpu, "
                                        "jetson, jetson-orin-nano, ... or a .toml path")]


DEFAULT_VAL_SIZE = 5000  # budget.DEFAULT_VAL_SIZE; the CLI module stays import-light
MaxDropOpt = Annotated[float | None, typer.Option("--max-drop", help="INT8 budget: most top-1 error (percentage "
                                                  "points) to lose against the FP32 model; sensitive layers stay "
                                                  "in float (FP32 on CPUs, FP16 in TensorRT bundles) until it holds")]
ValDataOpt = Annotated[str | None, typer.Option("--val-data", help="Images that decide the fallback (their test/val "
                                                "split); default: a held-out slice of the training split")]
ValSizeOpt = Annotated[int, typer.Option("--val-size", help="Validation images that decide (class-balanced)")]
BaselineOpt = Annotated[str | None, typer.Option("--baseline", help="With --weights pruned.pt: the unpruned model "
                                                 "the budget and the FP32 row are against: a tagged name (e.g. "
                                                 "resnet56.cifar10_akamaster) or an FP32 checkpoint")]


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint="--batch") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter("batch sizes must be >= 1", param_hint="--batch")
    return sizes


@app.command("export")
def export_cmd(
    model: ModelArg,
    target: TargetOpt = "cpu",
    int8: Annotated[bool, typer.Option("--int8", help="INT8: calibration (PTQ), then --qat-epochs of QAT")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 engine on the device (TensorRT targets)")] = False,
    prune: Annotated[float | None, typer.Option(help="Structured pruning: fraction of channels to remove")] = None,
    prune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs after pruning")] = 0,
    prune_lr: Annotated[float, typer.Option(help="Fine-tuning learning rate after pruning (cosine to 0)")] = 0.01,
    distill: Annotated[bool, typer.Option(help="Pruning fine-tune also learns the unpruned model's logits")] = True,
    train_precision: Annotated[str, typer.Option(help="Fine-tuning math: auto (bf16 on CPUs with native bf16), "
                                                 "fp32 or bf16")] = "auto",
    train_device: Annotated[str, typer.Option(help="Where pruning fine-tuning trains: cpu or cuda")] = "cpu",
    qat_epochs: Annotated[int, typer.Option(help="Quantization-aware training epochs after calibration")] = 0,
    qat_lr: Annotated[float, typer.Option(help="QAT learning rate (cosine to 0)")] = 1e-3,
    calib: Annotated[int | None, typer.Option(help="Calibration images (default: the set's own size)")] = None,
    calib_set: Annotated[str, typer.Option(help="Calibration set in calibration/")] = "default",
    weights: WeightsOpt = None,
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Export folder: created, or replaced whole on "
                                             "success if edgeres made it or it is empty; never a folder of "
                                             "yours")] = None,
    eval_limit: Annotated[int | None, typer.Option(help="Evaluate on N test images (default: all)")] = None,
    threads: Annotated[int | None, typer.Option(help="Runtime threads for latency (default: all cores)")] = None,
    max_drop: MaxDropOpt = None,
    val_data: ValDataOpt = None,
    val_size: ValSizeOpt = DEFAULT_VAL_SIZE,
    keep_best: Annotated[bool, typer.Option("--keep-best", help="With --max-drop out of reach: ship the best "
                                            "reached instead of failing")] = False,
    baseline: BaselineOpt = None,
    num_classes: NumClassesOpt = None,
    width: WidthOpt = None,
    shortcut: ShortcutOpt = None,
    input_size: InputSizeOpt = None,
    random_init: RandomInitOpt = False,
    skip_bad_images: SkipBadOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export MODEL for TARGET; report size, latency and top-1 error of each variant."""
    from edgeres import api
    from edgeres.report import render

    _no_weight_conflict(model, weights, random_init)
    _one_precision(int8, fp16)
    if (val_data is not None or keep_best) and max_drop is None:
        raise typer.BadParameter("--val-data and --keep-best go with --max-drop PP", param_hint="--max-drop")
    budget = None if max_drop is None else api.BudgetOptions(max_drop=max_drop, val_size=val_size, val_data=val_data,
                                                         keep_best=keep_best)
    opts = api.ExportOptions(target=target, int8=int8, fp16=fp16, prune=prune, prune_epochs=prune_epochs,
                             prune_lr=prune_lr, distill=distill, train_precision=train_precision,
                             train_device=train_device, qat_epochs=qat_epochs, qat_lr=qat_lr, calib=calib_set,
                             calib_size=calib, eval_limit=eval_limit, random_init=random_init,
                             bench=api.BenchOptions(batch_sizes=(1, 64), threads=threads),
                             skip_bad_images=skip_bad_images, budget=budget, baseline=baseline)
    with _library_output_to_stderr():
        report = api.export(model, weights=weights, data_spec=data, out=out, num_classes=num_classes, options=opts,
                            **_arch(width, shortcut, input_size, None))
    render(report, as_json=as_json, notes=report.notes)


@app.command("sensitivity")
def sensitivity_cmd(
    model: ModelArg,
    target: TargetOpt = "cpu",
    weights: WeightsOpt = None,
    data: DataOpt = None,
    calib: Annotated[int | None, typer.Option(help="Calibration images (default: the set's own size)")] = None,
    calib_set: Annotated[str, typer.Option(help="Calibration set in calibration/")] = "default",
    val_data: ValDataOpt = None,
    val_size: ValSizeOpt = DEFAULT_VAL_SIZE,
    baseline: BaselineOpt = None,
    threads: Annotated[int | None, typer.Option(help="Runtime threads (default: all cores)")] = None,
    random_init: RandomInitOpt = False,
    num_classes: NumClassesOpt = None,
    width: WidthOpt = None,
    shortcut: ShortcutOpt = None,
    input_size: InputSizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Rank MODEL's quantized layers by INT8 sensitivity, measured through TARGET's runtime (leave-one-in-float)."""
    from edgeres import api
    from edgeres.report import render

    _no_weight_conflict(model, weights, random_init)
    opts = api.ExportOptions(target=target, int8=True, calib=calib_set, calib_size=calib, baseline=baseline,
                             random_init=random_init,
                             bench=api.BenchOptions(batch_sizes=(1, 64), threads=threads),
                             budget=api.BudgetOptions(max_drop=0.0, val_size=val_size, val_data=val_data))
    with _library_output_to_stderr():
        result = api.sensitivity(model, weights=weights, data_spec=data, num_classes=num_classes, options=opts,
                             **_arch(width, shortcut, input_size, None))
    render(result, as_json=as_json)


@app.command("bench")
def bench_cmd(
    artifact: Annotated[Path, typer.Argument(help="model.onnx (ONNX Runtime), model.engine (TensorRT) or .xml")],
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes")] = "1,8,64",
    threads: Annotated[int | None, typer.Option(help="Runtime threads (default: all cores)")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed runs first")] = 10,
    runs: Annotated[int, typer.Option(help="Timed runs at batch 1 (fewer for large batches)")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Latency p50/p90/p99, throughput and peak memory of ARTIFACT, after warm-up."""
    from edgeres import api
    from edgeres.report import render

    with _library_output_to_stderr():
        result = api.bench(artifact, options=api.BenchOptions(_batch_sizes(batch), warmup, runs, threads))
    render(result, as_json=as_json)


@app.command("predict")
def predict_cmd(
    artifact: Annotated[Path, typer.Argument(help="model.onnx, OpenVINO model.xml, or model.engine (on the device)")],
    images: Annotated[list[Path], typer.Argument(help="Image files (any format Pillow reads)")],
    top: Annotated[int, typer.Option("--top", "-k", help="Classes per image")] = 5,
    as_json: JsonOpt = False,
) -> None:
    """Top-5 class names with probabilities for each IMAGE, prepared as ARTIFACT's own metadata says."""
    from edgeres import api
    from edgeres.report import render

    with _library_output_to_stderr():
        result = api.predict(artifact, images, top_k=top)
    render(result, as_json=as_json)


@app.command("report")
def report_cmd(
    dirs: Annotated[list[Path], typer.Argument(help="Export folders (each with report.json)")],
    as_json: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write top-1 error vs latency of every variant, "
                                              "Pareto front marked (PNG/SVG/PDF; needs matplotlib)")] = None,
) -> None:
    """One table over any number of export folders (targets x precisions x pruning)."""
    from edgeres.report import combine, plot_tradeoff, render

    combined = combine(dirs)
    if plot is not None:
        plot_tradeoff(combined, plot)
    if markdown:
        sys.stdout.write(combined.markdown())
    else:
        render(combined, as_json=as_json)


@app.command("targets")
def targets_cmd(as_json: JsonOpt = False) -> None:
    """List device profiles: runtime, precisions, memory, compute capability, DLA, TensorRT range."""
    from edgeres import api
    from edgeres.report import render

    render(api.list_targets(), as_json=as_json)


@app.command("check")
def check_cmd(
    onnx: Annotated[Path, typer.Argument(help="ONNX model to lint")],
    target: TargetOpt = "jetson",
    as_json: JsonOpt = False,
) -> None:
    """Lint ONNX for TensorRT: every construct it rejects (error) or runs slowly (warning); exit 1 on errors."""
    from edgeres import api
    from edgeres.report import render

    result = api.check(onnx, target)
    render(result, as_json=as_json)
    if not result.report.ok:
        raise typer.Exit(1)


@app.command("build")
def build_cmd(
    bundle: Annotated[Path, typer.Argument(help="Export folder written by `edgeres export --target jetson-...`")],
    dla_core: Annotated[int | None, typer.Option(help="DLA core to build for (INT8 via the calibration cache)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """On the device: build (or reuse, if its fingerprint matches) the TensorRT engine of BUNDLE."""
    from edgeres import api
    from edgeres.report import render

    render(api.build(bundle, dla_core=dla_core), as_json=as_json)


@app.command("fit")
def fit_cmd(
    family: Annotated[str, typer.Argument(help="Model family to size: wrn")],
    budget_mb: Annotated[float | None, typer.Option("--budget-mb", help="Memory budget in MiB (default: the "
                                                    "target's memory)")] = None,
    target: TargetOpt = "cpu",
    depth: Annotated[int, typer.Option(help="WRN depth D = 6n+4")] = 16,
    int8: Annotated[bool, typer.Option("--int8", help="Size for INT8 weights and activations")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Size for FP16 (TensorRT targets)")] = False,
    batch: Annotated[int | None, typer.Option(help="Batch size (default: the target's)")] = None,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms", help="Latency limit at that batch")] = None,
    prune: Annotated[str | None, typer.Option(help="Pruning ratios to try too, e.g. 0.25,0.5")] = None,
    runs: Annotated[Path | None, typer.Option(help="Folder of `edgeres train` runs: expected errors")] = None,
    max_width: Annotated[int, typer.Option(help="Widest k to consider")] = 16,
    train: Annotated[bool, typer.Option("--train", help="Train the pick and report its measured error")] = False,
    train_frontier: Annotated[bool, typer.Option(help="With --train: every Pareto-optimal fit")] = False,
    epochs: Annotated[int, typer.Option(help="Training epochs with --train")] = 164,
    data: DataOpt = None,
    plot: Annotated[Path | None, typer.Option(help="Write a Pareto plot (PNG) here")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pick the widest Wide-ResNet (and pruning ratio) that fits TARGET's memory and latency budget."""
    from edgeres import api
    from edgeres.report import render

    if family.lower() != "wrn":
        raise EdgeresError(f"fit sizes Wide ResNets; got {family!r}, use `edgeres fit wrn`")
    _one_precision(int8, fp16)
    try:
        ratios = tuple(float(r) for r in prune.split(",")) if prune else ()
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated fractions, got {prune!r}", param_hint="--prune") from None
    opts = api.FitOptions(depth=depth, target=target, budget_mb=budget_mb,
                      precision="int8" if int8 else "fp16" if fp16 else None, batch=batch, latency_ms=latency_ms,
                      prune=ratios, runs=str(runs) if runs else None, max_width=max_width, train=train,
                      train_frontier=train_frontier, train_config=api.TrainConfig(epochs=epochs), train_data=data,
                      plot=str(plot) if plot else None)
    with _library_output_to_stderr():
        report = api.fit(options=opts)
    render(report, as_json=as_json, notes=report.notes)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so temp files and folders are removed


def main() -> None:
    """Console entry point: user errors become one red line and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except EdgeresError as exc:
        if os.environ.get("EDGERES_DEBUG"):
            raise
        from edgeres.report import print_error

        print_error(str(exc))
        sys.exit(1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
