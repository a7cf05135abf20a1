"""fpe_lab.progress: plain occasional lines in logs, a normal bar on terminals."""

from __future__ import annotations

import io

from fpe_lab import config as cfg
from fpe_lab import runs
from fpe_lab.progress import progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logs_get_whole_lines_not_redraws():
    log = io.StringIO()
    bar = progress_bar(total=400, desc="train", file=log)
    for _ in range(400):
        bar.update(1)
        bar.set_postfix(dsm="1.0")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.count("\n") <= 3  # the first line, at most one per minute, the last
    assert "400/400" in text.splitlines()[-1]


def test_terminals_get_the_redrawing_bar():
    tty = _Tty()
    bar = progress_bar(total=400, desc="train", file=tty, mininterval=0, miniters=1)
    for _ in range(400):
        bar.update(1)
    bar.close()
    assert tty.getvalue().count("\r") > 100  # redrawn in place (a log would get these as one huge line)


def test_a_training_run_logs_a_few_lines(tmp_path, capsys):
    config = cfg.toy2d().override({("model", "width"): 8, ("model", "depth"): 1, ("optim", "steps"): 400,
                                   ("optim", "batch"): 8, ("eval", "points"): 4, ("eval", "nll_points"): 0,
                                   ("eval", "samples"): 0, ("eval", "times"): (0.5,), ("loss", "reg", "kind"): "none"})
    runs.train(config, tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and len(err) < 4000, len(err)
