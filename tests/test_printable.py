"""Values from SIP as policer shows them (:func:`policer.printable.printable`): one
unambiguous form in metric labels, JSON and terminals, for bytes that are not UTF-8
and for terminal control characters."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policer.call import raw_bytes, text
from policer.printable import from_printable, printable, printable_data

#: what a value from SIP may hold once policer.call.text kept it
sip_values = st.one_of(
    st.binary(max_size=30).map(text),
    st.text(max_size=30).map(text),
    st.text(alphabet=st.sampled_from(list("\\x0fu\x1b\x7f\x85\x9b\udcff\ud800é")),
            max_size=12).map(text),
)

#: what must never reach a terminal or a strict JSON / Prometheus reader
FORBIDDEN = {chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))}


def _clean(shown: str) -> bool:
    shown.encode("utf-8")  # no surrogate left
    return not set(shown) & FORBIDDEN


@settings(max_examples=500, deadline=None)
@given(v=sip_values)
def test_printable_round_trips_and_shows_no_control_character(v: str) -> None:
    shown = printable(v)
    assert _clean(shown)
    assert from_printable(shown) == v


@settings(max_examples=300, deadline=None)
@given(a=sip_values, b=sip_values)
def test_two_different_values_never_print_the_same(a: str, b: str) -> None:
    if raw_bytes(a) != raw_bytes(b):
        assert printable(a) != printable(b)


@pytest.mark.parametrize(("value", "shown"), [
    ("alice", "alice"),
    ("ü\U0001F600", "ü\U0001F600"),
    (text(b"m\xffx"), "m\\xffx"),
    ("m\\xffx", "m\\\\xffx"),  # the text of an escape is not the byte
    ("\x1b[2J", "\\x1b[2J"),
    ("a\r\nb\x00\x7f", "a\\x0d\\x0ab\\x00\\x7f"),
    ("\x9b2J", "\\u009b2J"),  # a C1 control is not the byte 0x9b
    (text(b"\x9b2J"), "\\x9b2J"),
    ("\ud800", "\\xed\\xa0\\x80"),  # a lone surrogate: the bytes the store keys it by
])
def test_the_escape_form(value: str, shown: str) -> None:
    assert printable(value) == shown


def test_printable_data_escapes_keys_values_and_odd_types() -> None:
    v = text(b"\xff\x1b")
    data = {v: [v, (v, 1)], "n": None, "b": True, "f": 1.5, "o": RuntimeError(v)}
    assert printable_data(data) == {
        "\\xff\\x1b": ["\\xff\\x1b", ["\\xff\\x1b", 1]], "n": None, "b": True, "f": 1.5,
        "o": "\\xff\\x1b"}


def test_from_printable_refuses_a_lone_backslash() -> None:
    with pytest.raises(ValueError, match="backslash"):
        from_printable("a\\b")


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_reads_the_shown_form_back_to_the_bytes() -> None:
    values = [text(b"m\xffx"), "\x1b[2J", "back\\slash", "\x85", "ü", text(b"\xc3(")]
    for v in values:
        out = subprocess.run(["bash", "-c", f"printf %s $'{printable(v)}'"],
                             capture_output=True, check=True,
                             env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"}).stdout
        assert out == raw_bytes(v), v
