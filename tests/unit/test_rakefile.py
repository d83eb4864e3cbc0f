"""Rakefile grammar (DESIGN §3)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from herder.rakefile import (
    DEFAULT_PORT,
    Action,
    Actionset,
    Host,
    MissingDigestError,
    Rakefile,
    RakefileError,
    load_rakefile,
    parse_rakefile,
    render_rakefile,
    to_job_submit,
)

SUM_OF_SQUARES = """\
# The classic acceptance example: sum of I^2 for I in 1..3
PORT  = 6238
HOSTS = localhost localhost:6239

compile:
\tremote-cc -c func1.c
\t\trequires func1.c
\tremote-cc -c func2.c
\t\trequires func2.c
\tremote-cc -c func3.c
\t\trequires func3.c

main:
\tremote-cc -c program3.c
\t\trequires program3.c

link:
\tcc -o program3 program3.o func1.o func2.o func3.o
"""

D = "0" * 64


def err(text: str) -> RakefileError:
    with pytest.raises(RakefileError) as ei:
        parse_rakefile(text)
    return ei.value


def where(text: str) -> tuple[int, int]:
    e = err(text)
    return e.line, e.col


# ------------------------------------------------------------------ valid


def test_sum_of_squares() -> None:
    rf = parse_rakefile(SUM_OF_SQUARES)
    assert rf.port == 6238
    assert rf.hosts == [Host("localhost", 6238), Host("localhost", 6239)]
    assert [a.name for a in rf.actionsets] == ["compile", "main", "link"]
    assert [a.line for a in rf.actionsets] == [5, 13, 17]
    compile_ = rf.actionsets[0]
    assert compile_.actions[0] == Action("cc -c func1.c", True, ["func1.c"], 6)
    assert [a.requires for a in compile_.actions] == [["func1.c"], ["func2.c"], ["func3.c"]]
    link = rf.actionsets[2].actions[0]
    assert link == Action("cc -o program3 program3.o func1.o func2.o func3.o", False, [], 18)


def test_model_is_frozen() -> None:
    rf = parse_rakefile(SUM_OF_SQUARES)
    with pytest.raises(AttributeError):
        rf.port = 1  # type: ignore[misc]


def test_defaults() -> None:
    rf = parse_rakefile("a:\n\techo hi\n")
    assert rf == Rakefile(DEFAULT_PORT, [], [Actionset("a", 1, [Action("echo hi", False, [], 2)])])
    assert DEFAULT_PORT == 6238


def test_comment_after_action_and_requires() -> None:
    rf = parse_rakefile(
        "build:   # header comment\n"
        "\tremote-cc -c a.c  # compile\n"
        "\t\trequires a.c a.h # inputs\n"
        "# a comment line\n"
        "\t# indented comment line\n"
        "   \t  \n"
        "\t\trequires b.h\n"
    )
    act = rf.actionsets[0].actions[0]
    assert act.command == "cc -c a.c"
    assert act.remote is True
    assert act.requires == ["a.c", "a.h", "b.h"]


def test_comment_cuts_command() -> None:
    rf = parse_rakefile("a:\n\techo '#not a comment'\n")
    assert rf.actionsets[0].actions[0].command == "echo '"


def test_port_after_hosts() -> None:
    rf = parse_rakefile("HOSTS = a b:7000 c\nx:\n\ttrue\nPORT = 9000\n")
    assert rf.port == 9000
    assert rf.hosts == [Host("a", 9000), Host("b", 7000), Host("c", 9000)]


def test_port_hosts_without_spaces_and_ipv6() -> None:
    rf = parse_rakefile("PORT=1\nHOSTS=\t[::1] [fe80::1]:22 10.0.0.1:80\nx:\n\ttrue\n")
    assert rf.port == 1
    assert rf.hosts == [Host("::1", 1), Host("fe80::1", 22), Host("10.0.0.1", 80)]
    assert str(rf.hosts[1]) == "[fe80::1]:22"


def test_subdirectory_requires() -> None:
    rf = parse_rakefile(
        "a:\n\tremote-cc -c src/a.c\n\t\trequires ./src/a.c src//inc/a.h\tsrc/a.c\n"
    )
    assert rf.actionsets[0].actions[0].requires == ["src/a.c", "src/inc/a.h"]


def test_local_and_remote_mix() -> None:
    rf = parse_rakefile("s:\n\techo local\n\tremote-echo remote\n\tremote-   spaced\n")
    acts = rf.actionsets[0].actions
    assert [(a.command, a.remote) for a in acts] == [
        ("echo local", False),
        ("echo remote", True),
        ("spaced", True),
    ]


def test_spaces_after_tab_and_trailing_ws_and_crlf_bom() -> None:
    rf = parse_rakefile("\ufeffa:\r\n\t  cc -c a.c \t\r\n\t\t requires  a.c\r\n")
    act = rf.actionsets[0].actions[0]
    assert act.command == "cc -c a.c"
    assert act.requires == ["a.c"]


def test_tabs_inside_command_kept() -> None:
    rf = parse_rakefile("a:\n\tprintf 'x\ty'\n")
    assert rf.actionsets[0].actions[0].command == "printf 'x\ty'"


def test_render_round_trip() -> None:
    rf = parse_rakefile(SUM_OF_SQUARES)
    for explicit in (True, False):
        again = parse_rakefile(render_rakefile(rf, explicit_ports=explicit))
        assert _strip_lines(again) == _strip_lines(rf)


def _strip_lines(rf: Rakefile) -> Rakefile:
    return Rakefile(
        rf.port,
        rf.hosts,
        [
            Actionset(s.name, 0, [Action(a.command, a.remote, a.requires, 0) for a in s.actions])
            for s in rf.actionsets
        ],
    )


def test_load_rakefile(tmp_path: Path) -> None:
    p = tmp_path / "Rakefile"
    p.write_text(SUM_OF_SQUARES)
    assert load_rakefile(p) == parse_rakefile(SUM_OF_SQUARES)


def test_load_rakefile_bad_utf8(tmp_path: Path) -> None:
    p = tmp_path / "Rakefile"
    p.write_bytes(b"a:\n\techo h\xc3\xa9 \xff\n")
    with pytest.raises(RakefileError) as ei:
        load_rakefile(p)
    e = ei.value
    assert (e.path, e.line, e.col) == (str(p), 2, 10)
    assert "UTF-8" in e.message and "0xff" in e.message


def test_load_missing_file(tmp_path: Path) -> None:
    # A file that cannot be read is a located RakefileError too (issue 11), not an OSError.
    with pytest.raises(RakefileError, match="does not exist") as ei:
        load_rakefile(tmp_path / "nope")
    assert str(ei.value).startswith(f"{tmp_path / 'nope'}:1:1: ")


# ------------------------------------------------------------------ errors


def test_error_str_and_fields() -> None:
    e = err("\techo\n")
    assert (e.path, e.line, e.col) == ("Rakefile", 1, 2)
    assert str(e) == f"Rakefile:1:2: {e.message}"
    assert "\n" not in str(e)
    assert "actionset header" in e.message
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e)


def test_error_path_argument() -> None:
    with pytest.raises(RakefileError, match=r"^jobs/R:1:1: "):
        parse_rakefile("foo bar\n", path="jobs/R")


@pytest.mark.parametrize(
    ("text", "line", "col", "fragment"),
    [
        # action before any header
        ("# c\n\n\tcc a.c\na:\n\tx\n", 3, 2, "action before any actionset header"),
        # requires with nothing / a header / a setting above it
        ("\t\trequires a.c\na:\n\tx\n", 1, 3, "must follow an action"),
        ("a:\n\t\trequires a.c\n\tx\n", 2, 3, "not an actionset header"),
        ("a:\n\tx\nPORT = 1\n\t\trequires a.c\n", 4, 3, "not a PORT/HOSTS line"),
        ("a:\n\tx\nb:\n\t\trequires a.c\n", 4, 3, "must follow an action"),
        # spaces
        ("a:\n    cc a.c\n", 2, 1, "indent with a tab, not spaces"),
        (" a:\n\tx\n", 1, 1, "indent with a tab, not spaces"),
        ("a:\n\t \tcc\n", 2, 2, "mixes spaces and tabs"),
        ("a:\n\tx\n\t  \trequires a\n", 3, 2, "mixes spaces and tabs"),
        # too many tabs
        ("a:\n\tx\n\t\t\trequires a.c\n", 3, 3, "too many tabs"),
        # two-tab line that is not requires
        ("a:\n\tx\n\t\tcc a.c\n", 3, 3, "must be 'requires file ...'"),
        ("a:\n\tx\n\t\trequiresa.c\n", 3, 3, "must be 'requires file ...'"),
        ("a:\n\tx\n\t\t  needs a.c\n", 3, 5, "must be 'requires file ...'"),
        # requires with no files
        ("a:\n\tx\n\t\trequires\n", 3, 11, "at least one file"),
        ("a:\n\tx\n\t\trequires   # nothing\n", 3, 11, "at least one file"),
        # requires at one tab
        ("a:\n\tx\n\trequires a.c\n", 3, 2, "two tabs"),
        # unsafe requires
        ("a:\n\tx\n\t\trequires ok.c ../up.c\n", 3, 17, "'..'"),
        ("a:\n\tx\n\t\trequires /etc/passwd\n", 3, 12, "absolute"),
        ("a:\n\tx\n\t\trequires .\n", 3, 12, "job root itself"),
        ("a:\n\tx\n\t\trequires a\\b\n", 3, 12, "backslash"),
        # PORT
        ("PORT = abc\na:\n\tx\n", 1, 8, "not an integer"),
        ("PORT = 12x\na:\n\tx\n", 1, 10, "not an integer"),
        ("PORT = -1\na:\n\tx\n", 1, 8, "not an integer"),
        ("PORT = 1 2\na:\n\tx\n", 1, 9, "not an integer"),
        ("PORT = 0\na:\n\tx\n", 1, 8, "out of range"),
        ("PORT = 65536\na:\n\tx\n", 1, 8, "out of range"),
        ("PORT =\na:\n\tx\n", 1, 7, "needs a value"),
        ("PORT = \u0663\na:\n\tx\n", 1, 8, "not an integer"),
        # HOSTS
        ("HOSTS = a b:\na:\n\tx\n", 1, 13, "port is missing"),
        ("HOSTS = a b:x1\na:\n\tx\n", 1, 13, "not an integer"),
        ("HOSTS = a b:99999\na:\n\tx\n", 1, 13, "out of range"),
        ("HOSTS = a :80\na:\n\tx\n", 1, 11, "host name is empty"),
        ("HOSTS = a b:1:2\na:\n\tx\n", 1, 14, "not an integer"),
        ("HOSTS = ok b@d\na:\n\tx\n", 1, 13, "not a valid host name"),
        ("HOSTS = [::1\na:\n\tx\n", 1, 9, "unclosed"),
        ("HOSTS = [::1]x\na:\n\tx\n", 1, 14, "expected ':port'"),
        ("HOSTS = [nope]:1\na:\n\tx\n", 1, 10, "not an IPv6"),
        ("HOSTS =   \na:\n\tx\n", 1, 8, "at least one host"),
        # unknown top-level lines
        ("foo bar\na:\n\tx\n", 1, 1, "expected 'PORT = n'"),
        ("port = 5\na:\n\tx\n", 1, 1, "upper-case"),
        ("FOO = 5\na:\n\tx\n", 1, 1, "unknown setting 'FOO'"),
        ("= 5\na:\n\tx\n", 1, 1, "unexpected line"),
        # duplicates
        ("PORT = 1\nPORT = 2\na:\n\tx\n", 2, 1, "duplicate PORT (first set at line 1)"),
        ("HOSTS = a\na:\n\tx\nHOSTS = b\n", 4, 1, "duplicate HOSTS (first set at line 1)"),
        ("a:\n\tx\na:\n\ty\n", 3, 1, "duplicate actionset 'a'"),
        # headers
        ("a:\n\tx\nb:\n", 3, 1, "'b' has no actions"),
        ("a:\nb:\n\tx\n", 1, 1, "'a' has no actions"),
        ("a:\n\tx\n:\n\ty\n", 3, 1, "name is empty"),
        ("a:\n\tx\n  \t:\n", 3, 1, "indent with a tab"),
        ("my set:\n\tx\n", 1, 3, "must not contain white space"),
        ("build:\tcc a.c\n", 1, 8, "unexpected text after actionset header 'build:'"),
        ("host:1234\n", 1, 6, "unexpected text after actionset header"),
        ("a:b:\n\tx\n", 1, 3, "unexpected text"),
        # no actionsets
        ("", 1, 1, "no actionsets"),
        ("# only a comment\n\nPORT = 5\n", 1, 1, "no actionsets"),
        # remote- with nothing
        ("a:\n\tremote-\n", 2, 9, "expected a command after 'remote-'"),
        ("a:\n\tremote-   # just a comment\n", 2, 9, "expected a command after 'remote-'"),
        # control characters
        ("a:\n\techo \x00\n", 2, 7, "U+0000"),
        ("a:\n\techo\rx\n", 2, 6, "U+000D"),
        ("a:\n\techo \ud800\n", 2, 7, "surrogate"),
    ],
)
def test_errors(text: str, line: int, col: int, fragment: str) -> None:
    e = err(text)
    assert (e.line, e.col) == (line, col), str(e)
    assert fragment in e.message, str(e)
    assert str(e) == f"Rakefile:{line}:{col}: {e.message}"


# ------------------------------------------------------------------ to_job_submit


def test_to_job_submit() -> None:
    rf = parse_rakefile(SUM_OF_SQUARES)
    files = ["func1.c", "func2.c", "func3.c", "program3.c"]
    digests = {f: f"{i:064x}" for i, f in enumerate(files)}
    job = to_job_submit(rf, name="sos", digests=digests, modes={"func1.c": 0o755})
    assert job.name == "sos"
    assert [s.name for s in job.stages] == ["compile", "main", "link"]
    t0 = job.stages[0].tasks[0]
    assert t0.name == "compile[0]"
    assert t0.command == "cc -c func1.c"
    assert t0.placement == "remote"
    assert [(r.path, r.digest, r.mode) for r in t0.requires] == [
        ("func1.c", digests["func1.c"], 0o755)
    ]
    assert job.stages[0].tasks[2].name == "compile[2]"
    assert job.stages[0].tasks[2].requires[0].mode is None
    link = job.stages[2].tasks[0]
    assert link.placement == "local"
    assert link.requires == []
    assert link.name == "link[0]"


def test_to_job_submit_options() -> None:
    rf = parse_rakefile("a:\n\tremote-true\n")
    job = to_job_submit(
        rf, name="j", digests={}, pool="p", priority=5, owner="me", idempotency_key="k"
    )
    assert (job.pool, job.priority, job.owner, job.idempotency_key) == ("p", 5, "me", "k")


def test_to_job_submit_missing_digest() -> None:
    rf = parse_rakefile("a:\n\tremote-cc -c src/a.c\n\t\trequires ./src/a.c\n")
    with pytest.raises(MissingDigestError, match=r"src/a\.c.*a\[0\].*line 2"):
        to_job_submit(rf, name="j", digests={})
    job = to_job_submit(rf, name="j", digests={"src/a.c": D})
    assert job.stages[0].tasks[0].requires[0].path == "src/a.c"
