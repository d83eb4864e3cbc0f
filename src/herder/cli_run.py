"""Helpers of ``herder run`` (herder.cli): direct mode, checked required files, signals."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from herder.cli_common import Exit, _fail
from herder.display import printable


def _run_direct(
    rakefile: Path, parsed: Any, workdir: Path, plain: bool, hosts: str | None
) -> NoReturn:
    """``herder run --direct``: the Rakefile's remote actions straight to agents."""
    from herder.build import BuildError, PlainReporter, Reporter, RichReporter
    from herder.direct import DirectBuild, HostRefused, parse_hosts
    from herder.rakefile import RakefileError

    try:
        targets = parse_hosts(hosts) if hosts is not None else [str(h) for h in parsed.hosts]
    except ValueError as exc:
        _fail(str(exc), 2)
    if not targets:
        _fail(f"{rakefile}: direct mode needs agents: a HOSTS line or --hosts HOST:PORT,…", 2)
    ok = False
    with _stop_on_signals():
        reporter: Reporter = (
            RichReporter() if sys.stdout.isatty() and not plain else PlainReporter()
        )
        build = _checked_build(DirectBuild, str(rakefile))(
            targets, parsed, workdir, reporter, name=_job_name(rakefile)
        )
        try:
            ok = build.run()
        except RakefileError as exc:
            _stop_reporter(reporter)
            _bad_input(str(exc))
        except HostRefused as exc:
            _stop_reporter(reporter)
            print(f"herder: {printable(str(exc))}", file=sys.stderr, flush=True)
            raise Exit(2) from None
        except BuildError as exc:
            _stop_reporter(reporter)
            _fail(f"{rakefile}: {exc}", 2)
        finally:
            build.close()
    raise Exit(0 if ok else 1)


def _bad_input(line: str) -> NoReturn:
    """A bad job file or Rakefile: its one ``file:line:col: message`` line, exit 2."""
    print(printable(line), file=sys.stderr, flush=True)
    raise Exit(2)


def _check_requires(path: str, actions: list[Any], workdir: Path) -> None:
    """Exit 2 at the first required file of the remote ``actions`` that cannot be sent."""
    from herder.rakefile import requires_error

    for action in actions:
        if action.remote:
            err = requires_error(path, action, workdir)
            if err is not None:
                raise err


def _checked_build(base: Any, path: str) -> Any:
    """``Build`` that checks an actionset's required files before it submits the actionset:
    a bad one is a RakefileError at its ``requires`` word and nothing of the set is sent."""

    class CheckedBuild(base):  # type: ignore[misc]
        def _submit(self, index: int, run: Any) -> int | None:
            _check_requires(path, [a.action for a in run.actions], self.workdir)
            result: int | None = super()._submit(index, run)
            return result

    return CheckedBuild


def _job_name(rakefile: Path) -> str:
    """The Rakefile's path as a job name: printable, and short enough that
    ``"{name}: {actionset}"`` fits the API's 200 characters."""
    name = printable(str(rakefile))
    return name if len(name) <= 98 else "..." + name[-95:]


def _stop_reporter(reporter: Any) -> None:
    live = getattr(reporter, "live", None)
    if live is not None:
        live.stop()


class _Stopped(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C, so the embedded farm stops with us."""


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    import signal

    def stop(signum: int, _frame: Any) -> None:
        raise _Stopped(signal.Signals(signum).name)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    except (_Stopped, KeyboardInterrupt) as exc:
        name = str(exc) or "SIGINT"
        print(f"herder run: stopped by {name}", file=sys.stderr, flush=True)
        raise Exit(130 if name == "SIGINT" else 143) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
