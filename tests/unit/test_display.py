"""What the CLI prints of the farm's text cannot drive a terminal (issue 11)."""

from __future__ import annotations

import pytest

from herder.display import control_problem, markup_safe, printable


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain name", "plain name"),
        ("a\x1b[31mred", "a\\x1b[31mred"),
        ("nul\x00", "nul\\x00"),
        ("c1\x9b2J", "c1\\x9b2J"),
        ("del\x7f", "del\\x7f"),
        ("two\nlines\r", "two\\nlines\\r"),
        ("tab\there", "tab\\there"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("line\u2028sep", "line\\u2028sep"),
        ("lone\udcff", "lone\\udcff"),
        ("é ü 日本 \\ back", "é ü 日本 \\ back"),  # printable text and backslashes untouched
    ],
)
def test_printable(text: str, shown: str) -> None:
    assert printable(text) == shown


def test_printable_keeps_tabs_on_request_and_takes_any_object() -> None:
    assert printable("a\tb\x1b", keep_tabs=True) == "a\tb\\x1b"
    assert printable(42) == "42"


def test_markup_safe_escapes_rich_markup_too() -> None:
    from rich.console import Console

    console = Console(width=200, force_terminal=False, color_system=None)
    with console.capture() as cap:
        evil = "[red]x[/red]\x1b"
        console.print(f"[bold]{markup_safe(evil)}[/bold]")
    assert cap.get().strip() == "[red]x[/red]\\x1b"


def test_control_problem() -> None:
    assert control_problem("fine name") is None
    assert control_problem("bad\x1bname") == (
        3,
        "contains a control character '\\x1b'; names must be printable",
    )
