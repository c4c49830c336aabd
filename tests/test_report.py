import json

import pytest

from edgeres.errors import EdgeresError
from edgeres.report import VariantRow, combine


def _row(**kw):
    base = dict(variant="fp32", target="cpu", runtime="onnxruntime", precision="fp32", pruned=0.0, params=10,
                macs=100, size_mb=1.0, latency_ms_p50=1.0, throughput_ips=100.0, top1_error=8.0,
                top1_error_delta=0.0, top1_accuracy=92.0, eval_images=10000, file="fp32.onnx")
    return VariantRow(**{**base, **kw})


def _write(d, model, rows):
    d.mkdir()
    (d / "report.json").write_text(json.dumps({"model": model, "rows": [r.to_dict() for r in rows]}))
    return d


def test_combine_sorts_and_renders(tmp_path):
    a = _write(tmp_path / "a", "resnet20", [_row(), _row(variant="int8", precision="int8", file="model.onnx")])
    b = _write(tmp_path / "b", "resnet20", [_row(target="jetson-orin-nano", variant="int8", precision="int8",
                                                 latency_ms_p50=None, throughput_ips=None)])
    c = _write(tmp_path / "c", "resnet18", [_row()])
    rep = combine([a, b, c])
    assert [(r.model, r.target, r.precision) for r in rep.rows] == [
        ("resnet18", "cpu", "fp32"), ("resnet20", "cpu", "fp32"), ("resnet20", "cpu", "int8"),
        ("resnet20", "jetson-orin-nano", "int8")]
    md = rep.markdown()
    assert md.count("\n") == 2 + 4 and "| resnet20 | int8 | jetson-orin-nano |" in md.replace("  ", " ")
    assert json.loads(json.dumps(rep.to_dict()))["rows"][3]["latency_ms_p50"] is None


def test_combine_rejects_non_reports(tmp_path):
    with pytest.raises(EdgeresError, match="no report.json"):
        combine([tmp_path])
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(EdgeresError, match="not an edgeres report"):
        combine([tmp_path])


def test_piped_table_is_never_cut(capsys):
    """Redirected output has no screen edge: headers and numbers print whole, not as 'par…' or '269…'."""
    from edgeres.report import CombinedReport, render

    render(CombinedReport([_row(params=269_722, macs=41_120_394, model="resnet20")], ["a"]))
    out = capsys.readouterr().out
    assert "41,120,394" in out and "269,722" in out and "top-1 err %" in out and "…" not in out


def _point(variant, precision, latency, error, target="cpu"):
    return _row(variant=variant, precision=precision, latency_ms_p50=latency, top1_error=error, target=target,
                model="m")


def test_tradeoff_front_keeps_rows_nothing_beats():
    from edgeres.report import tradeoff_front

    rows = [_point("fp32", "fp32", 1.0, 8.0), _point("int8", "int8", 0.3, 8.3),
            _point("int8 + 1 fp32", "int8", 0.35, 8.1), _point("slow", "int8", 0.5, 8.2),
            _point("trt", "int8", None, 7.0, "jetson")]
    assert [r.variant for r in tradeoff_front(rows)] == ["int8", "int8 + 1 fp32", "fp32"]


def test_plot_tradeoff_writes_a_picture_and_needs_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import builtins

    from edgeres.errors import EdgeresError
    from edgeres.report import CombinedReport, plot_tradeoff

    report = CombinedReport([_point("fp32", "fp32", 1.0, 8.0), _point("int8", "int8", 0.3, 8.3),
                             _point("trt", "int8", None, 7.0, "jetson")], ["a"])
    out = plot_tradeoff(report, tmp_path / "t.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(EdgeresError, match=r"\.png, \.svg or \.pdf"):
        plot_tradeoff(report, tmp_path / "t.gif")
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(EdgeresError, match="needs matplotlib"):
        plot_tradeoff(report, tmp_path / "u.png")
    assert not (tmp_path / "u.png").exists()


def test_plot_tradeoff_never_replaces_a_file_it_did_not_write(tmp_path):
    pytest.importorskip("matplotlib")
    from edgeres.errors import EdgeresError
    from edgeres.report import CombinedReport, plot_tradeoff

    report = CombinedReport([_point("fp32", "fp32", 1.0, 8.0), _point("int8", "int8", 0.3, 8.3)], ["a"])
    users = tmp_path / "mine.png"
    users.write_bytes(b"the user's own picture")
    with pytest.raises(EdgeresError, match="edgeres did not write it"):
        plot_tradeoff(report, users)
    assert users.read_bytes() == b"the user's own picture"
    ours = plot_tradeoff(report, tmp_path / "t.png")
    first = ours.read_bytes()
    plot_tradeoff(report, ours)  # its own earlier plot may be replaced
    assert ours.read_bytes()[:8] == first[:8] == b"\x89PNG\r\n\x1a\n"
