"""The export pipeline: load -> prune -> fold BN -> INT8 (PTQ, QAT) -> ONNX -> compile -> measure -> report.

Each stage is a module of its own (compress/, export.py, backends/, bench.py); this file only
runs them in order for one target and writes the export folder whole or not at all.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from edgeres import artifact_meta, data, manifest, targets
from edgeres.backends.base import RuntimeOptions, get_backend
from edgeres.bench import artifact_bytes, host_text
from edgeres.budget import BudgetOptions
from edgeres.calibration import calibration_batches, load_calibration
from edgeres.checkpoint import load_model, require_weights, untrained
from edgeres.errors import EdgeresError
from edgeres.evaluate import evaluate_session
from edgeres.hostcpu import describe, has_native_bf16
from edgeres.io import atomic_dir, atomic_write, check_output_dir
from edgeres.latency import BenchOptions, Worker
from edgeres.models.stats import count_macs, count_params
from edgeres.progress import info
from edgeres.report import RANDOM_WEIGHTS, ExportReport, VariantRow

TRAIN_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ExportOptions:
    """Everything `edgeres export` can be asked; None-valued fields take the stage's defaults."""

    target: str = "cpu"
    int8: bool = False
    fp16: bool = False  # TensorRT targets: the device builds the FP32 ONNX as an FP16 engine
    prune: float | None = None
    prune_epochs: int = 0
    prune_lr: float = 0.01
    distill: bool = True  # pruning fine-tune learns from the unpruned model's logits too
    train_precision: str = "auto"  # fine-tuning math: "auto" (bf16 where the hardware has it natively), "fp32", "bf16"
    train_device: str = "cpu"  # where pruning recovery trains: "cpu" or "cuda"; QAT and every measurement stay on CPU
    qat_epochs: int = 0
    qat_lr: float = 1e-3
    calib: str = "default"
    calib_size: int | None = None
    batch_size: int = 128
    eval_limit: int | None = None  # None: the full test split (what the report is for)
    bench: BenchOptions = field(default_factory=lambda: BenchOptions(batch_sizes=(1, 64), warmup=10, runs=100))
    seed: int = 0
    random_init: bool = False  # export untrained weights (latency/memory work); every row says so
    skip_bad_images: bool = False  # undecodable files are skipped and counted instead of stopping the export
    budget: BudgetOptions | None = None  # --max-drop: layers fall back to float until the drop is within it
    baseline: str | None = None  # the unpruned model a pruned checkpoint (--weights pruned.pt) is judged against


def _train_device(opts: ExportOptions) -> torch.device:
    """The device pruning recovery trains on; asking for CUDA where there is none is an error."""
    if opts.train_device not in ("cpu", "cuda"):
        raise EdgeresError(f"--train-device must be cpu or cuda, got {opts.train_device!r}")
    if opts.train_device == "cuda" and not torch.cuda.is_available():
        raise EdgeresError("--train-device cuda asked for but no GPU is available; pass --train-device cpu")
    return torch.device(opts.train_device)


def _bf16_training(opts: ExportOptions) -> bool:
    """Whether fine-tuning runs under bfloat16 autocast (QAT always stays fp32)."""
    if opts.train_precision not in TRAIN_PRECISIONS:
        raise EdgeresError(f"--train-precision must be one of {', '.join(TRAIN_PRECISIONS)}, "
                           f"got {opts.train_precision!r}")
    if opts.train_precision != "auto":
        return opts.train_precision == "bf16"
    if _train_device(opts).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return has_native_bf16()


def _finetune(model: nn.Module, train_ds, epochs: int, lr: float, opts: ExportOptions, desc: str,
              criterion=None) -> list[dict]:
    """SGD with a cosine schedule for `epochs` over the training split (pruning recovery), on `opts.train_device`;
    the model (and a distillation teacher) come back to the CPU."""
    from edgeres.finetune import FinetuneOptions, finetune

    device = _train_device(opts)
    history = finetune(
        model,
        lambda epoch: data.batches(train_ds, opts.batch_size, mean=model.cfg.mean, std=model.cfg.std, train=True,
                                   seed=opts.seed, epoch=epoch),
        epochs, steps_per_epoch=data.num_batches(train_ds, opts.batch_size), desc=desc, criterion=criterion,
        options=FinetuneOptions(lr=lr, momentum=0.9, weight_decay=1e-4, bf16=_bf16_training(opts), device=str(device)),
    )
    model.eval()
    return history


class _Measure:
    """Measures every variant the same way: top-1 through the target's runtime, latency and throughput.

    Where the target's runtime runs on this host, the artifact that ships is compiled, evaluated and timed
    (`edgeres.latency`, in a fresh worker process, as `edgeres bench` would). Elsewhere (a TensorRT engine is
    built on the device) its ONNX is validated through ONNX Runtime and its latency is left unmeasured.
    """

    def __init__(self, target: targets.Target, test_ds, mean, std, opts: ExportOptions, weights: str,
                 worker: Worker | None) -> None:
        self.target, self.test_ds, self.mean, self.std, self.opts = target, test_ds, mean, std, opts
        self.weights, self.worker = weights, worker
        self.baseline_error: float | None = None
        backend = get_backend(target.runtime)
        self.runs_here = backend.runs_on_host
        self.backend = backend if self.runs_here else get_backend("onnxruntime")

    def row(self, variant: str, precision: str, onnx_path: Path, model: nn.Module, pruned: float) -> VariantRow:
        artifact = self.backend.compile(onnx_path, self.target, onnx_path.with_suffix(self.backend.suffix))
        session = self.backend.load(artifact, RuntimeOptions(threads=self.opts.bench.threads))
        result = evaluate_session(self.backend, session, self.test_ds, mean=self.mean, std=self.std,
                                  desc=f"eval {variant}")
        cov = self.coverage(onnx_path, artifact, session)
        del session  # its threads must not compete with the measuring worker
        if self.baseline_error is None:
            self.baseline_error = result.top1_error
        p50 = ips = None
        if self.runs_here:
            size = model.cfg.input_size
            rows = self.worker.measure(artifact, self.opts.bench, (3, size, size)).rows
            p50, ips = rows[0].p50_ms, rows[-1].throughput_ips  # smallest batch's latency, largest's throughput
        if artifact.meta.get("execution", {}).get("bf16_ops"):
            precision = "bf16"  # what really runs, never a bf16 figure under an fp32 label
        return VariantRow(
            variant=variant, target=self.target.name, runtime=artifact.runtime, precision=precision,
            pruned=pruned, params=count_params(model), macs=count_macs(model),
            size_mb=round(artifact_bytes(artifact) / 1e6, 4), latency_ms_p50=p50, throughput_ips=ips,
            top1_error=result.top1_error, top1_error_delta=round(result.top1_error - self.baseline_error, 4),
            top1_accuracy=result.top1_accuracy, eval_images=result.total, file=artifact.path.name,
            latency_source=f"measured ({artifact.runtime}, this machine, fresh worker process)" if self.runs_here
            else f"not measured: build and bench on the {self.target.name} device",
            model=model.cfg.name, weights=self.weights, int8_macs_pct=round(100 * cov.int8_mac_share, 2),
            int8_coverage=cov.to_dict(),
        )

    def coverage(self, onnx_path: Path, artifact, session):
        """INT8 share of MACs: measured from the runtime here, from the Q/DQ placement for TensorRT bundles."""
        import onnx

        from edgeres import coverage
        from edgeres.fallback import all_layers

        model = onnx.load(str(onnx_path))
        if not self.runs_here:
            return coverage.expected(model)
        return self.backend.int8_coverage(artifact, session, all_layers(model))


def _agreement(model: nn.Module, onnx_path: Path, test_ds, n: int = 256) -> dict:
    """Logits of the PyTorch model against ONNX Runtime on the first n test images."""
    from edgeres.backends.base import open_artifact
    from edgeres.backends.ort import OrtBackend

    backend = OrtBackend()
    session = backend.load(open_artifact(onnx_path))
    sub = test_ds.take(torch.arange(min(n, len(test_ds))))
    x, _ = next(data.batches(sub, n, mean=model.cfg.mean, std=model.cfg.std))
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    got = backend.run(session, x.numpy())
    return {
        "images": int(len(x)),
        "max_abs_logit_diff": round(float(abs(ref - got).max()), 6),
        "top1_agreement": round(float((ref.argmax(1) == got.argmax(1)).mean() * 100), 3),
    }


def _check_options(opts: ExportOptions) -> tuple[targets.Target, str]:
    """The target and the precision it will run; every contradiction is an error before any work."""
    target = targets.load(opts.target)
    if opts.int8 and opts.fp16:
        raise EdgeresError("pass --int8 or --fp16, not both")
    precision = "int8" if opts.int8 else "fp16" if opts.fp16 else "fp32"
    target.require(precision)
    backend = get_backend(target.runtime)  # a missing runtime fails here, in one line
    if precision not in backend.precisions:
        raise EdgeresError(f"--{precision} is not a precision {backend.name} builds ({', '.join(backend.precisions)}); "
                           f"{target.name} runs {target.runtime}")
    if opts.prune is not None and not 0.0 < opts.prune < 1.0:
        raise EdgeresError(f"--prune must be a fraction in (0, 1), got {opts.prune}")
    if opts.prune is None and opts.prune_epochs:
        raise EdgeresError("--prune-epochs needs --prune R")
    if not opts.int8 and opts.qat_epochs:
        raise EdgeresError("--qat-epochs needs --int8")
    if opts.budget is not None:
        if not opts.int8:
            raise EdgeresError("--max-drop is a budget for INT8; pass --int8 with it")
        if not opts.budget.max_drop >= 0:
            raise EdgeresError(f"--max-drop must be >= 0 percentage points, got {opts.budget.max_drop}")
        if opts.budget.val_size < 1:
            raise EdgeresError(f"--val-size must be >= 1, got {opts.budget.val_size}")
    if opts.baseline is not None and opts.prune is not None:
        raise EdgeresError("--baseline is for a checkpoint pruned earlier (--weights pruned.pt); drop --prune")
    _bf16_training(opts)  # rejects an unknown --train-precision or --train-device before any work
    if opts.int8:
        load_calibration(opts.calib, size=opts.calib_size)  # an unknown set or bad --calib fails before any work
    return target, precision


def _prune_stage(net: nn.Module, train_ds, opts: ExportOptions, example: torch.Tensor) -> tuple[nn.Module, dict]:
    """Structured pruning, then fine-tuning (distilled from the unpruned model); the pruned model and its figures."""
    from edgeres.compress.distill import Distillation
    from edgeres.compress.prune import prune, pruned_spec

    rep = prune(net, opts.prune, example_input=example)
    work = rep.model
    teacher = Distillation(copy.deepcopy(net)) if opts.distill and opts.prune_epochs else None
    history = _finetune(work, train_ds, opts.prune_epochs, opts.prune_lr, opts, "prune fine-tune", teacher) \
        if opts.prune_epochs else []
    return work, {"ratio": opts.prune, "epochs": opts.prune_epochs, "lr": opts.prune_lr,
                  "distillation": teacher.to_dict() if teacher else None,
                  "train_precision": ("bf16" if _bf16_training(opts) else "fp32") if opts.prune_epochs else None,
                  "params_before": rep.params_before, "params_after": rep.params_after,
                  "macs_before": rep.macs_before, "macs_after": rep.macs_after,
                  "macs_cut": round(rep.macs_cut, 4), "history": history, "spec": pruned_spec(work)}


def _fold_stage(work: nn.Module, example: torch.Tensor) -> tuple[nn.Module, dict]:
    """BN folded into convolutions, checked numerically against the unfolded model."""
    from edgeres.compress.fold_bn import fold_bn

    fold = fold_bn(work, example_input=example)
    with torch.no_grad():
        x = torch.randn(8, *example.shape[1:])
        err = float((fold.model(x) - work.eval()(x)).abs().max())
    return fold.model, {"folded": fold.folded, "unfoldable": fold.unfoldable, "max_abs_logit_diff": err}


def _quantize_stage(work: nn.Module, train_ds, opts: ExportOptions, example: torch.Tensor,
                    tmp: Path) -> tuple[nn.Module, dict]:
    """INT8: calibration on the calibration set, then QAT; the stripped model for export."""
    from edgeres.compress import quantize

    cfg = work.cfg
    calib = load_calibration(opts.calib, size=opts.calib_size)
    info(f"[bold]INT8 calibration[/] on {calib.size} {calib.split} images ({calib.name})")
    qmodel = quantize.ptq(work, calibration_batches(calib, train_ds, cfg.mean, cfg.std), example_input=example)
    history: list[dict] = []
    if opts.qat_epochs:
        quantize.qat(
            qmodel,
            lambda e: data.batches(train_ds, opts.batch_size, mean=cfg.mean, std=cfg.std, train=True,
                                   seed=opts.seed, epoch=e),
            opts.qat_epochs, steps_per_epoch=data.num_batches(train_ds, opts.batch_size),
            options=quantize.QatOptions(lr=opts.qat_lr),
            on_epoch=lambda e, loss, top1: history.append(
                {"epoch": e + 1, "loss": round(loss, 4), "train_accuracy": round(top1, 2)}),
        )
    quantize.save_quantized(tmp / "int8_nncf.pt", qmodel)
    return quantize.strip(qmodel, example), {
        "calibration": calib.to_dict(), "qat_epochs": opts.qat_epochs, "qat_lr": opts.qat_lr,
        "qat_history": history, "weights": "int8 symmetric per-channel (axis 0)",
        "activations": "int8 symmetric per-tensor"}


def _baseline(opts: ExportOptions, weights, net: nn.Module, num_classes, arch: dict) -> tuple[nn.Module, dict | None]:
    """The model the user's budget is against: `--baseline M` (unpruned) when `--weights` is a pruned checkpoint."""
    if opts.baseline is None:
        return net, None
    from edgeres.checkpoint import read_checkpoint

    ckpt = read_checkpoint(weights) if weights is not None else None
    if ckpt is None or not ckpt.pruned:
        raise EdgeresError("--baseline names the unpruned model of a pruned checkpoint; pass --weights pruned.pt "
                           "(written by `edgeres export --prune`)")
    if Path(opts.baseline).is_file():  # the user's own FP32 checkpoint (it names its model)
        base = load_model(None, opts.baseline, num_classes=num_classes, **arch).eval()
    else:  # a tagged name; random weights would judge nothing
        require_weights(opts.baseline, None, False)
        base = load_model(opts.baseline, None, num_classes=num_classes, **arch).eval()
    if base.cfg.num_classes != net.cfg.num_classes or base.cfg.input_size != net.cfg.input_size:
        raise EdgeresError(f"--baseline {opts.baseline} has {base.cfg.num_classes} classes at "
                           f"{base.cfg.input_size} px; the checkpoint {net.cfg.num_classes} at {net.cfg.input_size}")
    pruning = dict((ckpt.extra or {}).get("pruning") or {})
    pruning.update({"from_checkpoint": str(weights), "baseline": opts.baseline})
    return base, pruning


def export(
    model_name: str | None,
    *,
    weights: str | os.PathLike | None = None,
    data_spec: str | None = None,
    out: str | os.PathLike | None = None,
    num_classes: int | None = None,
    options: ExportOptions = ExportOptions(),
    **arch,
) -> ExportReport:
    """Run the whole pipeline for one target and write `out` (model.onnx, manifest.json, report.json)."""
    from edgeres.export import export_onnx

    opts = options
    target, precision = _check_options(opts)
    net = load_model(model_name, weights, num_classes=num_classes, new_head=False, **arch).eval()
    random = require_weights(model_name, weights, opts.random_init) or untrained(net)  # after the name is checked
    baseline, pruned_from = _baseline(opts, weights, net, num_classes, arch)
    pruned = opts.prune is not None or pruned_from is not None
    cfg = net.cfg
    source = RANDOM_WEIGHTS if random else str(weights) if weights is not None else str(model_name)
    out = check_output_dir(out or f"out/{cfg.name}-{target.name}-{precision}{'-pruned' if pruned else ''}")
    spec = data_spec or cfg.dataset
    test_ds = data.for_model(cfg, spec, "test", skip_bad_images=opts.skip_bad_images)
    fix = (f"fine-tune it for {test_ds.num_classes} classes first (edgeres train ... --num-classes "
           f"{test_ds.num_classes}) or pass data with {cfg.num_classes} classes")
    data.check_classes(test_ds, cfg.num_classes, cfg.name, fix=fix)
    if opts.eval_limit:
        test_ds = data.subset(test_ds, opts.eval_limit, seed=opts.seed)
    needs_train = opts.int8 or (opts.prune is not None and opts.prune_epochs > 0)
    train_ds = data.for_model(cfg, spec, "train", skip_bad_images=opts.skip_bad_images) if needs_train else None
    if train_ds is not None:
        data.check_classes(train_ds, cfg.num_classes, cfg.name, fix=fix)
    if opts.budget is not None:
        _validation_images(opts, train_ds, test_ds)  # a bad --val-data fails here, before any work
    example = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
    notes: list[str] = []
    if test_ds.synthetic:
        notes.append("synthetic data: the top-1 figures are a smoke test, not an accuracy")
    if random:
        notes.append("random weights (--random-init): every top-1 error figure here means nothing; "
                     "size and latency are real")
    if precision == "fp16":
        notes.append("fp16: top-1 is that of the FP32 ONNX through ONNX Runtime; the device builds it as FP16")
    host = None
    backend = get_backend(target.runtime)
    if not backend.runs_on_host:
        notes.append(f"latency not measured here: on the device run `bash build.sh` then `edgeres bench "
                     f"model{backend.suffix}` (top-1 above is this exact ONNX through ONNX Runtime)")
    else:
        host = describe()
        host["threads"] = opts.bench.threads or host["cores_available"]
        notes.append(f"latency measured{host_text(host)}, {host['threads']} threads, in a fresh worker process "
                     "(as `edgeres bench` measures it)")

    meta = _artifact_meta(net, target, test_ds, spec, model_name, weights)
    if random and not meta.weights.get("random_init"):  # a checkpoint that records untrained weights (pruned.pt)
        meta = replace(meta, weights={**meta.weights, "random_init": True})
    with atomic_dir(out) as tmp, Worker() as worker:
        measure = _Measure(target, test_ds, cfg.mean, cfg.std, opts, source, worker)
        info(f"[bold]FP32 baseline[/] {baseline.cfg.name}")
        export_onnx(baseline, tmp / "fp32.onnx", input_size=cfg.input_size)
        artifact_meta.embed_onnx(tmp / "fp32.onnx", replace(meta, precision="fp32"))
        rows = [measure.row("fp32", "fp32", tmp / "fp32.onnx", baseline, 0.0)]

        work, prune_info, ratio = net, pruned_from, float((pruned_from or {}).get("ratio") or 0.0)
        if opts.prune is not None:
            work, prune_info = _prune_stage(net, train_ds, opts, example)
            ratio = opts.prune
        if pruned:
            export_onnx(work, tmp / "pruned_fp32.onnx", input_size=cfg.input_size)
            artifact_meta.embed_onnx(tmp / "pruned_fp32.onnx", replace(meta, precision="fp32"))
            rows.append(measure.row("pruned fp32", "fp32", tmp / "pruned_fp32.onnx", work, ratio))
            if opts.prune is not None:
                _save_pruned(tmp / "pruned.pt", work, prune_info, baseline=rows[0], weights=source)
        deployed, fold_info = _fold_stage(work, example)
        if fold_info["unfoldable"]:  # pre-activation BNs: no conv before them to fold into
            fold_info["unfoldable_run_as"] = "int8 depthwise 1x1 conv" if opts.int8 else "fp32 BatchNormalization"
        quant_info = budget_info = None
        float_nodes: list[str] = []
        if opts.int8:
            deployed, quant_info = _quantize_stage(work, train_ds, opts, example, tmp)
        deployed.cfg = cfg
        if opts.budget is not None:
            result = _budget_stage(deployed, tmp, target, measure, train_ds, quant_info, opts, pruned)
            budget_info, float_nodes = result.to_dict(), result.float_nodes
            if not result.met and not opts.budget.keep_best:
                raise EdgeresError(f"INT8 budget {opts.budget.max_drop} pp {result.verdict}; nothing was written. "
                                   "Pass a larger --max-drop, or --keep-best to ship the best reached")
        _write_model_onnx(deployed, tmp / "model.onnx", target, cfg.input_size, opts.int8, float_nodes)
        artifact_meta.embed_onnx(tmp / "model.onnx", replace(meta, precision=precision))
        variant = ("pruned " if pruned else "") + precision
        if float_nodes:
            variant += f" + {len(float_nodes)} {get_backend(target.runtime).fallback_precision}"
        rows.append(measure.row(variant, precision, tmp / "model.onnx", deployed, ratio))
        if budget_info is not None:
            budget_info["test"] = _budget_test(rows, pruned, opts.budget.max_drop)
            notes.append(_budget_note(budget_info))
        notes += _coverage_notes(rows)
        agreement = _agreement(deployed, tmp / "model.onnx", test_ds)
        extras = _target_extras(tmp, target, deployed, precision, replace(meta, precision=precision), test_ds)
        skipped = sorted(set(test_ds.skipped) | set(train_ds.skipped if train_ds is not None else []))
        if skipped:
            notes.append(f"{len(skipped)} undecodable images skipped (--skip-bad-images); first: {skipped[0]}")
        report = ExportReport(
            model=cfg.name, target=target.name, out=str(out), rows=rows, fold=fold_info, prune=prune_info,
            quantization=quant_info, agreement=agreement, notes=notes, extras=extras, host=host,
            budget=budget_info,
        )
        with atomic_write(tmp / "report.json") as f:
            f.write_text(json.dumps(report.to_dict(), indent=2))
        final = rows[-1]
        manifest.write(tmp, cfg=deployed.cfg, target=target.name, runtime=target.runtime, precision=precision, extra={
            "classes": list(cfg.classes) if cfg.classes else test_ds.classes, "data": test_ds.name,
            "skipped_images": len(skipped), **extras,
            "weights": {"source": source, "random": random},
            "pruning": prune_info and {k: v for k, v in prune_info.items() if k != "history"},
            "quantization": quant_info, "bn_fold": fold_info,
            "mixed_precision": budget_info and {"float_layers": budget_info["fallback"],
                                                "fallback_precision": get_backend(target.runtime).fallback_precision,
                                                "max_drop_pp": budget_info["max_drop_pp"], "met": budget_info["met"]},
            "validation": {"top1_error": final.top1_error, "top1_accuracy": final.top1_accuracy,
                           "eval_images": final.eval_images, "runtime": final.runtime,
                           "logits_agreement": agreement, "int8_coverage": final.int8_coverage}})  # written last
    return report


def _save_pruned(path: Path, model: nn.Module, prune_info: dict, *, baseline: VariantRow,
                 weights: str | os.PathLike | None) -> None:
    """The pruned, fine-tuned FP32 model as an edgeres checkpoint, with the unpruned model's measured figures, so a
    later export can start from it (`--weights pruned.pt`) and still judge accuracy against the model the user gave."""
    from edgeres.checkpoint import save_checkpoint

    save_checkpoint(path, model, pruned=prune_info["spec"], extra={"unpruned_baseline": {
        "model": model.cfg.name, "weights": str(weights) if weights else None, "top1_error": baseline.top1_error,
        "eval_images": baseline.eval_images, "runtime": baseline.runtime},
        "random_init": str(weights) == RANDOM_WEIGHTS,  # so what it exports later says so too
        "pruning": {k: v for k, v in prune_info.items() if k not in ("history", "spec")}})


def _artifact_meta(net: nn.Module, target: targets.Target, test_ds, spec, model_name: str | None,
                   weights: str | os.PathLike | None) -> artifact_meta.ArtifactMeta:
    """What every ONNX of this export carries: classes (the model's, else the data set's), preprocessing,
    weights provenance; the precision is set per file."""
    named = str(spec).lower() in data.CIFAR
    return artifact_meta.for_model(
        net, precision="fp32", weights=artifact_meta.weights_provenance(model_name, weights), target=target.name,
        data_classes=None if test_ds.synthetic else test_ds.classes,
        dataset=str(spec).lower() if named else (None if test_ds.synthetic else test_ds.name),
    )


def _budget_stage(deployed: nn.Module, tmp: Path, target: targets.Target, measure: _Measure, train_ds,
                  quant_info: dict, opts: ExportOptions, pruned: bool, rank_only: bool = False):
    """Decide which layers stay out of INT8 (budget.search) on images the test figure is not reported on."""
    import shutil

    import onnx

    from edgeres import budget
    from edgeres.export import export_onnx

    bopts = opts.budget
    cfg = deployed.cfg
    val_ds, decided = _validation_images(opts, train_ds, measure.test_ds)
    decided["measured_on"] = f"{len(measure.test_ds)} {measure.test_ds.name} {measure.test_ds.split} images"
    decided["runtime"] = measure.backend.name + ("" if measure.runs_here else " (the TensorRT bundle's own ONNX)")
    work = tmp / "search"
    work.mkdir()
    try:
        export_onnx(deployed, work / "raw.onnx", input_size=cfg.input_size)
        candidate = budget.Candidate.for_target(onnx.load(str(work / "raw.onnx")), target)
        judge = budget.Judge(measure.backend, target, val_ds, cfg.mean, cfg.std, work, opts.bench.threads)
        judge.runs_here = measure.runs_here
        result = budget.search(candidate, judge, reference_onnx=onnx.load(str(tmp / "fp32.onnx")),
                               float_onnx=onnx.load(str(tmp / "pruned_fp32.onnx")) if pruned else None,
                               options=bopts, decided_on=decided, rank_only=rank_only)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info(f"[bold]INT8 budget[/] {result.verdict or 'ranked'} ({result.search_seconds:.0f} s, "
         f"{result.evaluations} evaluations)")
    return result


def sensitivity(
    model_name: str | None,
    *,
    weights: str | os.PathLike | None = None,
    data_spec: str | None = None,
    num_classes: int | None = None,
    options: ExportOptions = ExportOptions(int8=True),
    **arch,
):
    """Every quantized layer ranked by sensitivity through the target's runtime (no artifact is written)."""
    import tempfile

    from edgeres.budget import BudgetOptions, SensitivityReport
    from edgeres.export import export_onnx

    opts = replace(options, int8=True, budget=options.budget or BudgetOptions(max_drop=0.0))
    target, _ = _check_options(opts)
    net = load_model(model_name, weights, num_classes=num_classes, new_head=False, **arch).eval()
    random = require_weights(model_name, weights, opts.random_init) or untrained(net)
    baseline, pruned_from = _baseline(opts, weights, net, num_classes, arch)
    cfg = net.cfg
    spec = data_spec or cfg.dataset
    test_ds = data.load_dataset(spec, "test", image_size=cfg.input_size)
    train_ds = data.load_dataset(spec, "train", image_size=cfg.input_size)
    example = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
    with tempfile.TemporaryDirectory(prefix="edgeres-sensitivity-") as name:
        tmp = Path(name)
        export_onnx(baseline, tmp / "fp32.onnx", input_size=cfg.input_size)
        if pruned_from is not None:
            export_onnx(net, tmp / "pruned_fp32.onnx", input_size=cfg.input_size)
        deployed, quant_info = _quantize_stage(net, train_ds, opts, example, tmp)
        deployed.cfg = cfg
        source = RANDOM_WEIGHTS if random else str(weights) if weights is not None else str(model_name)
        measure = _Measure(target, test_ds, cfg.mean, cfg.std, opts, source, worker=None)  # no rows: no latency
        result = _budget_stage(deployed, tmp, target, measure, train_ds, quant_info, opts, pruned_from is not None,
                               rank_only=True)
    return SensitivityReport(model=cfg.name, target=target.name, result=result, random_weights=random)


def _validation_images(opts: ExportOptions, train_ds, test_ds) -> tuple[data.Dataset, dict]:
    """The images that decide the fallback, never the test split the final error is reported on."""
    from edgeres import budget
    from edgeres.calibration import calibration_indices, load_calibration

    bopts = opts.budget
    if bopts.val_data is not None:
        val_ds = data.load_dataset(bopts.val_data, "test", image_size=test_ds.image_size)
        if val_ds.name == test_ds.name and val_ds.split == test_ds.split:
            raise EdgeresError(f"--val-data {bopts.val_data} is the test split the final error is reported on; "
                               "pass other images, or leave it out for a held-out slice of the training split")
        val_ds = data.subset(val_ds, bopts.val_size, seed=opts.seed)
        return val_ds, {"images": len(val_ds), "source": f"--val-data {bopts.val_data} ({val_ds.split} split), "
                        "class-balanced"}
    calib = load_calibration(opts.calib, size=opts.calib_size)
    val_ds = budget.held_out_slice(train_ds, calibration_indices(calib, train_ds), bopts.val_size, opts.seed)
    return val_ds, {"images": len(val_ds), "source": f"a class-balanced slice of the {train_ds.name} training split "
                    f"held out from calibration (its {calib.size} images excluded; seed {opts.seed + 1})"}


def _budget_test(rows: list[VariantRow], pruned: bool, max_drop: float) -> dict:
    """The final figures on the test split: the drop against the user's FP32, split into pruning and quantization."""
    fp32, final = rows[0], rows[-1]
    pruned_row = rows[1] if pruned else None
    out = {"images": final.eval_images, "fp32_error": fp32.top1_error, "final_error": final.top1_error,
           "final_drop_pp": round(final.top1_error - fp32.top1_error, 4),
           "within_budget": final.top1_error - fp32.top1_error <= max_drop + 1e-9}
    if pruned_row is not None:
        out["pruning_cost_pp"] = round(pruned_row.top1_error - fp32.top1_error, 4)
        out["quantization_cost_pp"] = round(final.top1_error - pruned_row.top1_error, 4)
    return out


def _budget_note(b: dict) -> str:
    t, v = b["test"], b["validation"]
    names = "; ".join(_fallback_text(f) for f in b["fallback"]) or "none"
    text = (f"INT8 budget {b['max_drop_pp']} pp: {b['verdict']}. Decided on {b['decided_on']['images']} images "
            f"({b['decided_on']['source']}): all-INT8 {v['all_int8_drop_pp']:+.2f} pp; float layers: {names}. "
            f"Final on {t['images']} test images: {t['final_drop_pp']:+.2f} pp")
    if "pruning_cost_pp" in t:
        text += f" (pruning {t['pruning_cost_pp']:+.2f}, quantization {t['quantization_cost_pp']:+.2f})"
    if not t["within_budget"]:
        text += " - over the budget on the test split: the validation images did not predict it"
    return text + f"; search {b['search_seconds']:.0f} s, {b['evaluations']} evaluations"


def _fallback_text(step: dict) -> str:
    """`layer1.0.conv1 (/layer1/layer1.0/conv1/Conv): recovers 0.04 pp; +0.021 ms b1, -31 img/s b64, +0.006 MB`."""
    cost = [f"{step['latency_cost_ms']:+.3f} ms b1" if step["latency_cost_ms"] is not None else None,
            f"{-step['throughput_cost_ips']:+.0f} img/s b64" if step["throughput_cost_ips"] is not None else None,
            f"{step['size_cost_mb']:+.3f} MB"]
    return (f"{step['layer']} ({step['node']}): recovers {step['sensitivity_pp']:.2f} pp; "
            + ", ".join(c for c in cost if c))


def _coverage_notes(rows: list[VariantRow]) -> list[str]:
    """A float layer where INT8 was asked for is named, never only folded into a percentage."""
    notes = []
    for r in rows:
        cov = r.int8_coverage or {}
        if r.precision == "int8" and cov.get("float_layers"):
            notes.append(f"{r.variant}: {r.int8_macs_pct:.1f} % of MACs in INT8 ({cov['source']}); not INT8: "
                         f"{', '.join(cov['float_layers'])}")
    return notes


def _write_model_onnx(model: nn.Module, path: Path, target: targets.Target, input_size: int, int8: bool,
                      float_nodes: list[str] | None = None) -> None:
    """model.onnx: FP32 as exported, INT8 in the Q/DQ dialect of the target's runtime (its backend's flavour);
    `float_nodes` (the budget's fallback layers) without Q/DQ, FP16-typed where the backend falls back to FP16."""
    import tempfile

    import onnx

    from edgeres.budget import Candidate
    from edgeres.export import export_onnx, save_onnx

    if int8:
        with tempfile.TemporaryDirectory(prefix="edgeres-int8-") as tmp:
            raw = export_onnx(model, Path(tmp) / "raw.onnx", input_size=input_size)
            save_onnx(Candidate.for_target(onnx.load(str(raw)), target).model(list(float_nodes or [])), path)
    else:
        export_onnx(model, path, input_size=input_size)


def _target_extras(tmp: Path, target: targets.Target, model: nn.Module, precision: str,
                   meta: artifact_meta.ArtifactMeta, test_ds) -> dict:
    """What the target's runtime adds beside model.onnx (`Backend.bundle_extras`; TensorRT: lint, build script,
    DLA cache, README, the stand-alone runner with golden inputs, the clearest of the first 64 test images)."""

    def first_images():
        head = test_ds.take(torch.arange(min(64, len(test_ds))))  # in memory or streamed from an ImageFolder
        return next(data.batches(head, 64, mean=meta.preprocess.mean, std=meta.preprocess.std))[0].numpy()

    size = model.cfg.input_size
    return get_backend(target.runtime).bundle_extras(tmp, target, onnx_name="model.onnx", precision=precision,
                                                     input_shape=(3, size, size), meta=meta, images=first_images)
