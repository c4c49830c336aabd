import io

from edgeres import progress


def test_plain_progress_prints_timed_lines_and_the_end():
    out = io.StringIO()
    bar = progress.PlainProgress(every_s=3600, stream=out)
    task = bar.add_task("qat 1/1", total=4, status="")
    for i in range(4):
        bar.update(task, advance=1, status=f"loss {1.0 - i / 10:.2f}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qat 1/1: 4/4 (100%) loss 0.70")  # only the end, not per step
    bar = progress.PlainProgress(every_s=0, stream=out)
    task = bar.add_task("eval", total=None)
    bar.update(task, advance=2)
    assert out.getvalue().splitlines()[-1].startswith("eval: 2, ")  # no total: a count, no percentage


def test_progress_in_a_log_is_plain_and_quiet_means_silent(monkeypatch, capsys):
    monkeypatch.delenv("EDGERES_QUIET", raising=False)
    with progress.progress() as bar:  # pytest captures stderr: not a terminal
        assert isinstance(bar, progress.PlainProgress)
        task = bar.add_task("train 1/1", total=1, status="")
        bar.update(task, advance=1, status="acc 10.00%")
    assert "train 1/1: 1/1 (100%) acc 10.00%" in capsys.readouterr().err
    monkeypatch.setenv("EDGERES_QUIET", "1")
    with progress.progress() as bar:
        task = bar.add_task("train", total=1, status="")
        bar.update(task, advance=1, status="")
    assert capsys.readouterr().err == ""
