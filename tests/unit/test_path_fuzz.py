"""hypothesis fuzzing of the path validators (issue 11): whatever the path, the
answer is a safe path or the project's own error (UnsafePath, a ValueError),
never another exception, and nothing accepted ever leaves the root, through
``..``, an absolute path or any symlink on the way.

The file-system cases run in one fixed tree holding every kind of trap: a
symlink to /etc/passwd, to /etc, a relative one climbing out, one inside, a
loop, a dangling one, a FIFO, a directory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herder.api_models import OutputFile, RequiredFile
from herder.inputs import required_file_problem
from herder.names import name_problem
from herder.paths import UnsafePath, normalize_relpath, resolve_inside

# Pieces a hostile path is made of: the traps in the tree below and every
# separator or special component a path validator must not be fooled by.
PIECES = [
    "a",
    "sub",
    "file",
    "pw",
    "etc",
    "up",
    "inside",
    "loop",
    "dangling",
    "fifo",
    "passwd",
    "..",
    ".",
    "",
    "...",
    "\\",
    "..\\..",
    "\x00",
    "~",
    "%2e%2e",
    "\u2025",  # TWO DOT LEADER: not '..'
    "\uff0e\uff0e",  # fullwidth dots: not '..'
    "a\nb",
    "\x1b[31m",
]

paths = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(PIECES), max_size=8).map("/".join),
    st.lists(st.sampled_from(PIECES), max_size=8).map(lambda p: "/" + "/".join(p)),
)

FUZZ = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])


def inside(root_real: str, path: str) -> bool:
    return path == root_real or path.startswith(root_real + os.sep)


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="herder-pathfuzz-") as tmp:
        root = Path(tmp) / "root"
        (root / "sub").mkdir(parents=True)
        (root / "file").write_text("x")
        (root / "sub" / "file").write_text("y")
        (root / "pw").symlink_to("/etc/passwd")
        (root / "etc").symlink_to("/etc")
        (root / "up").symlink_to("../..")
        (root / "sub" / "up").symlink_to("../../..")
        (root / "inside").symlink_to("sub")
        (root / "sub" / "inside").symlink_to("../file")
        (root / "loop").symlink_to("loop")
        (root / "dangling").symlink_to("nowhere")
        os.mkfifo(root / "fifo")
        (Path(tmp) / "passwd").write_text("outside the root")
        yield root


@FUZZ
@given(paths)
def test_normalize_relpath_is_safe_or_refuses(path: str) -> None:
    try:
        norm = normalize_relpath(path)
    except UnsafePath as exc:
        assert str(exc)
        return
    parts = norm.split("/")
    assert norm and not norm.startswith("/") and "\\" not in norm and "\x00" not in norm
    assert all(p not in ("", ".", "..") for p in parts), norm
    assert normalize_relpath(norm) == norm  # canonical: normalising again changes nothing


@FUZZ
@given(paths)
def test_resolve_inside_never_leaves_the_root(tree: Path, path: str) -> None:
    root_real = os.path.realpath(tree)
    try:
        got = resolve_inside(tree, path)
    except UnsafePath as exc:
        assert str(exc)
        return
    # The parent directories lead nowhere outside, and neither does a final symlink.
    assert inside(root_real, os.path.realpath(got.parent)), (path, got)
    if got.is_symlink():
        assert inside(root_real, os.path.realpath(got)), (path, got)


def _walk_every_parent(root: Path, relpath: str) -> Path:
    """The slow reference: resolve the root and every file's parent, always."""
    rel = normalize_relpath(relpath)
    real = Path(os.path.realpath(root))
    target = real.joinpath(*rel.split("/"))
    parent = Path(os.path.realpath(target.parent))
    if parent != real and real not in parent.parents:
        raise UnsafePath("escapes")
    if target.is_symlink():
        dest = Path(os.path.realpath(target))
        if dest != real and real not in dest.parents:
            raise UnsafePath("points outside")
    return target


def _outcome(fn: Callable[[], Path]) -> Path | str:
    try:
        return fn()
    except UnsafePath:
        return "refused"


@FUZZ
@given(paths)
def test_resolve_inside_with_a_known_root_real_path_decides_the_same(tree: Path, path: str) -> None:
    # The agent passes the sandbox's real path it already knows (and the
    # client's top-level files skip the parent walk): same answers, escapes included.
    real = os.path.realpath(tree)
    got = _outcome(lambda: resolve_inside(tree, path, root_real=real))
    assert got == _outcome(lambda: resolve_inside(tree, path)), path
    assert got == _outcome(lambda: _walk_every_parent(tree, path)), path
    if isinstance(got, Path):
        assert inside(real, os.path.realpath(got.parent)), (path, got)


@FUZZ
@given(paths)
def test_required_file_problem_answers_for_any_path(tree: Path, path: str) -> None:
    try:
        rel = normalize_relpath(path)
    except UnsafePath:
        return
    problem = required_file_problem(tree, rel)  # never raises, never blocks on the FIFO
    if problem is None:
        real = os.path.realpath(tree.joinpath(*rel.split("/")))
        assert inside(os.path.realpath(tree), real), (path, real)
        assert os.path.isfile(real)
    else:
        assert problem.startswith(f"required file {rel!r} "), problem


@FUZZ
@given(paths)
def test_wire_path_fields_refuse_with_a_validation_error(path: str) -> None:
    for model, extra in ((RequiredFile, {}), (OutputFile, {"size": 1})):
        try:
            got = model.model_validate({"path": path, "digest": "0" * 64, **extra})
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            assert "path" in str(exc)
            continue
        assert got.path == normalize_relpath(path)
        assert name_problem(got.path) is None


@FUZZ
@given(st.text(max_size=60))
def test_name_problem_answers_for_any_text(name: str) -> None:
    problem = name_problem(name)
    assert problem is None or isinstance(problem, str)
