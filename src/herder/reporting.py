"""What `herder run` shows: one line per event, or live progress on a terminal (DESIGN §12).

Every line goes through :func:`herder.display.printable`: an action's output,
command or error cannot drive the terminal (tabs in output are kept).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from herder.display import markup_safe, printable

if TYPE_CHECKING:
    from herder.build import ActionRun, SetRun


class PlainReporter:
    """Line output for logs and pipes: one line per event."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.out: TextIO = stream or sys.stdout

    def _p(self, text: str) -> None:
        # Flushed by refresh() (at most every 0.1 s) and finish(): one write
        # per batch of finished actions, not one per line.
        print(printable(text, keep_tabs=True), file=self.out)

    def start_set(self, run: SetRun) -> None:
        self._p(f"== {run.actionset.name}: {len(run.actions)} action(s)")

    def action_started(self, run: SetRun, action: ActionRun) -> None:
        pass

    def action_finished(self, run: SetRun, a: ActionRun) -> None:
        where = "remote" if a.action.remote else "local"
        for stream, text in (("stdout", a.stdout), ("stderr", a.stderr)):
            for line in text.splitlines():
                self._p(f"[{a.label} {stream}] {line}")
        status = "ok" if a.state == "succeeded" else f"FAILED ({a.error or a.state})"
        self._p(
            f"-- {a.label} ({where}) `{a.action.command}` {status} in {a.elapsed:.2f}s "
            f"[{run.done}/{len(run.actions)}]"
        )

    def refresh(self, sets: list[SetRun]) -> None:
        self.out.flush()

    def finish(self, sets: list[SetRun], ok: bool, elapsed: float) -> None:
        total = sum(len(s.actions) for s in sets)
        done = sum(s.done for s in sets)
        if ok:
            self._p(
                f"build succeeded: {done} action(s) in {len(sets)} actionset(s), {elapsed:.2f}s"
            )
            self.out.flush()
            return
        for s in sets:
            for a in s.actions:
                if a.state == "failed":
                    self._p(
                        f"build FAILED: action {a.label} `{a.action.command}` (line {a.action.line}): "
                        f"{a.error or 'failed'}"
                    )
                    if a.stderr.strip():
                        self._p(f"stderr of {a.label}:")
                        for line in a.stderr.rstrip().splitlines():
                            self._p(f"  {line}")
        self._p(f"build FAILED after {elapsed:.2f}s ({done}/{total} actions succeeded)")
        self.out.flush()


class RichReporter(PlainReporter):
    """Live progress on a terminal: per actionset done/total, running actions, failures."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console()
        super().__init__(None)
        self.live = Live(console=self.console, refresh_per_second=8, transient=True)
        self.live.start()
        self._sets: list[SetRun] = []

    def _p(self, text: str) -> None:
        self.console.print(printable(text, keep_tabs=True), highlight=False, markup=False)

    def start_set(self, run: SetRun) -> None:
        self._sets.append(run)
        super().start_set(run)
        self.refresh(self._sets)

    def refresh(self, sets: list[SetRun]) -> None:
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        for s in sets:
            failed = sum(1 for a in s.actions if a.state == "failed")
            table.add_row(
                f"[bold]{markup_safe(s.actionset.name)}[/bold]",
                f"{s.done}/{len(s.actions)} done"
                + (f", [red]{failed} failed[/red]" if failed else ""),
            )
            for a in s.actions:
                if a.state == "running":
                    table.add_row(
                        f"  {markup_safe(a.label)}",
                        f"{a.elapsed:5.1f}s  {markup_safe(a.action.command)}",
                    )
        self.live.update(table)

    def finish(self, sets: list[SetRun], ok: bool, elapsed: float) -> None:
        self.live.stop()
        super().finish(sets, ok, elapsed)
