"""Policies that are big, deep, aliased or hostile: every bound is a policy error with
its place (``FILE:LINE:COL``), never a traceback; long prefix lists read from a file
beside the policy (``prefixes_file``); and a bounded fuzz of the loader."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policer.classify import Classifier
from policer.policy import Policy, PolicyError, load_policy, parse_policy
from policer.policy.bounds import MAX_ALIAS_NODES, MAX_DEPTH, MAX_ERRORS
from tests.support import POLICIES
from tests.support.cli import run_cli

HEAD = "version: 1\nnamespace: x\n"


def errors_of(text: str, source: str = "p.yaml") -> list[str]:
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, source)
    return exc.value.errors


# ----------------------------------------------------------------------------- depth


@pytest.mark.parametrize("text", [
    "a: " + "[" * 5000,  # the file: a traceback and exit 1 before
    "a: " + "[" * 5000 + "]" * 5000,
    "a: " + "{b: " * 5000 + "1" + "}" * 5000,
    "".join(" " * i + "k:\n" for i in range(2000)) + " " * 2000 + "k: 1\n",
    "- " * 3000 + "1\n",
])
def test_deep_nesting_is_a_syntax_error_with_its_place(text: str) -> None:
    errors = errors_of(text)
    assert len(errors) == 1
    assert errors[0].startswith("p.yaml:")
    assert errors[0].endswith(f": (syntax): collections nested more than {MAX_DEPTH} deep")


def test_nesting_up_to_the_bound_is_only_a_wrong_type() -> None:
    text = HEAD + "call: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n"
    assert errors_of(text) == ["p.yaml:3:7: call: expected a mapping, got a list"]


def test_check_of_a_deep_policy_exits_2_with_the_place(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000)
    proc = run_cli("check", str(deep))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    # the document's mapping is the first level, the 99th '[' (column 102) the 100th
    assert proc.stderr.strip() == (f"{deep}:1:{3 + MAX_DEPTH}: (syntax): collections nested "
                                   f"more than {MAX_DEPTH} deep")


# ----------------------------------------------------------------------------- size


def test_a_policy_over_the_size_bound_is_refused_before_it_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "# padding\n" * 20)
    monkeypatch.setenv("POLICER_POLICY_MAX_BYTES", "100")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    size = path.stat().st_size
    assert exc.value.errors == [
        f"{path}:1:1: (file): {size} bytes, more than the 100 a policy file may have "
        "(set POLICER_POLICY_MAX_BYTES to allow more)"]
    monkeypatch.setenv("POLICER_POLICY_MAX_BYTES", str(size))
    assert load_policy(path).namespace == "x"
    monkeypatch.setenv("POLICER_POLICY_MAX_BYTES", "lots")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.errors == [
        f"{path}:1:1: (file): POLICER_POLICY_MAX_BYTES is not a number of bytes: 'lots'"]


def test_the_size_bound_defaults_to_16_mib(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    with path.open("w") as f:  # a sparse file: its size is checked, nothing is read
        f.truncate(16 * 1024 * 1024 + 1)
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.errors == [
        f"{path}:1:1: (file): 16777217 bytes, more than the 16777216 a policy file may "
        "have (set POLICER_POLICY_MAX_BYTES to allow more)"]


# ----------------------------------------------------------------------------- aliases


def test_aliases_that_multiply_a_small_file_are_refused() -> None:
    # "billion laughs": nine levels of ten aliases each name 10^9 nodes in 700 bytes
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    text = HEAD + "call:\n" + "".join(f"  {ln}\n" for ln in lines)
    errors = errors_of(text)
    assert len(errors) == 1
    assert errors[0].endswith(f": (syntax): aliases repeat more than {MAX_ALIAS_NODES} "
                              "nodes: write the repeated parts out")


def test_a_recursive_alias_is_refused() -> None:
    errors = errors_of(HEAD + "call: &c {number: *c}\n")
    assert errors == ["p.yaml:3:7: (syntax): an alias names a collection that contains it"]


def test_a_shared_answer_through_an_alias_reads_as_written() -> None:
    p = parse_policy(HEAD + "profiles: {a: {}, b: {}}\nlimits:\n"
                     "  a: {max: 1, reject: &busy {code: 486, reason: Busy}}\n"
                     "  b: {max: 2, reject: *busy}\n")
    assert p.limits["a"].reject == p.limits["b"].reject
    assert p.limits["b"].reject.reason == "Busy"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("value", "error"), [
    ("!!python/object:os.system 1", "expected an integer, got os.system '1'"),
    ("!!binary 1", "expected an integer, got binary '1'"),
    ("!!int x", "expected an integer, got int 'x'"),
    ("!!timestamp 2020-13-45", "expected an integer, got timestamp '2020-13-45'"),
    ("!foo 1", "expected an integer, got !foo '1'"),
])
def test_a_value_yaml_cannot_build_is_a_value_of_the_wrong_type(value: str,
                                                                 error: str) -> None:
    """The safe constructor refuses these (ConstructorError, ValueError): a traceback
    before, a policy error now."""
    assert errors_of(HEAD + f"pending_queue: {value}\n") == [f"p.yaml:3:16: pending_queue: "
                                                               f"{error}"]


def test_a_file_of_many_errors_lists_the_first_ones_and_counts_the_rest() -> None:
    bad = ", ".join([*(f"x{i}!" for i in range(MAX_ERRORS + 50)), "0"])
    errors = errors_of(HEAD + f"classes:\n  a: {{prefixes: [{bad}]}}\n")
    assert len(errors) == MAX_ERRORS + 1
    assert errors[0] == "p.yaml:4:18: classes.a.prefixes[0]: not a dialled number or prefix: " \
                        "'x0!'"
    assert errors[-1] == (f"p.yaml:1:1: (file): 50 more errors not listed (the first "
                          f"{MAX_ERRORS} are)")


def test_a_long_value_is_cut_in_its_message() -> None:
    errors = errors_of(HEAD + "classes:\n  a: {prefixes: ['" + "7" * 5000 + "', '0']}\n")
    assert errors == ["p.yaml:4:18: classes.a.prefixes[0]: not a dialled number or prefix: "
                      f"'{'7' * 40}'..."]


# ----------------------------------------------------------------------------- long lists


def long_list(n: int, start: int = 10**7) -> list[str]:
    return [f"00{start + i * 7919}" for i in range(n)]


def test_a_long_inline_list_reads_whole_and_classifies() -> None:
    prefixes = long_list(20_000)
    text = HEAD + "classes:\n  p: {prefixes: [" + ", ".join(prefixes) + "]}\n" \
        "  other: {default: true}\n"
    p = parse_policy(text)
    assert p.classes[0].prefixes == tuple(prefixes)
    c = Classifier(p)
    assert c.number_class(prefixes[12_345] + "99") == "p"
    assert c.number_class("0012") == "other"


@pytest.mark.parametrize(("items", "error"), [
    # the one bad item of a long list is found at its place (the list is checked whole
    # first, then item by item when that fails)
    (["'007'", "'0 8'"], "7:14: classes.a.prefixes[1001]: not a dialled number or prefix: '0 8'"),
    (["'007'", "'007'"], "7:14: classes.a.prefixes[1001]: '007' is listed twice"),
    (["'007'", '"0\\n9"'], "7:14: classes.a.prefixes[1001]: not a dialled number or prefix: "
                           "'0\\n9'"),
    (["'007'", "null"], "7:14: classes.a.prefixes[1001]: expected a number, got nothing"),
    (["'007'", "[1]"], "7:14: classes.a.prefixes[1001]: expected a number, got a list"),
])
def test_a_bad_item_of_a_long_list_is_reported_at_its_place(items: list[str],
                                                           error: str) -> None:
    text = HEAD + "classes:\n  a:\n    prefixes: [\n      " + \
        ", ".join(f"'9{i:04d}'" for i in range(1000)) + ",\n      " + ", ".join(items) + "]\n"
    assert errors_of(text) == [f"p.yaml:{error}"]


# ----------------------------------------------------------------------------- prefixes_file


def write_policy(tmp_path: Path, classes: str, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    path = tmp_path / "policy.yaml"
    path.write_text(HEAD + "classes:\n" + classes)
    return path


def test_the_shipped_example_reads_its_list_beside_it() -> None:
    p = load_policy(POLICIES / "premium.yaml")
    assert p.files == (str(POLICIES / "premium-rate.txt"),)
    c = Classifier(p)
    assert [c.number_class(n) for n in ("09001234", "0137555", "0088112345", "0301234")] \
        == ["premium", "premium", "premium", "national"]


def test_a_prefixes_file_skips_blanks_and_comments_and_keeps_hash_digits(
        tmp_path: Path) -> None:
    path = write_policy(tmp_path, "  p: {prefixes_file: lists/p.txt, prefixes: ['0900']}\n",
                        {"lists/p.txt": "# head\n\n0137\n  0138  # a comment\n*31#\r\n"
                                        "\t# indented comment\n0180"})
    p = load_policy(path)
    assert p.classes[0].prefixes == ("0900", "0137", "0138", "*31#", "0180")
    assert p.files == (str(tmp_path / "lists" / "p.txt"),)


def test_errors_of_a_prefixes_file_are_at_its_lines(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "  p: {prefixes_file: p.txt, prefixes: ['0137']}\n"
                                  "  q: {prefixes: ['0700']}\n"
                                  "  r: {prefixes_file: r.txt}\n",
                        {"p.txt": "0900\nabc!\n  09 00\n0900\n0137\n",
                         "r.txt": "# ok\n0700\n"})
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    lst, other = tmp_path / "p.txt", tmp_path / "r.txt"
    assert exc.value.errors == [
        f"{lst}:2:1: classes.p.prefixes_file: not a dialled number or prefix: 'abc!'",
        f"{lst}:3:3: classes.p.prefixes_file: not a dialled number or prefix: '09 00'",
        f"{lst}:4:1: classes.p.prefixes_file: '0900' is listed twice",
        f"{lst}:5:1: classes.p.prefixes_file: '0137' is listed twice",
        f"{other}:2:1: classes.r.prefixes_file: prefix '0700' is already in class 'q'",
    ]
    assert exc.value.files == (str(lst), str(other))


def test_a_missing_binary_or_oversized_prefixes_file(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_policy(tmp_path, "  p: {prefixes_file: missing.txt}\n"
                                  "  q: {prefixes_file: bin.txt}\n"
                                  "  r: {prefixes_file: big.txt}\n",
                        {"big.txt": "0900\n" * 30})
    (tmp_path / "bin.txt").write_bytes(b"0900\n09\xff0\n")
    monkeypatch.setenv("POLICER_PREFIXES_MAX_BYTES", "100")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    assert exc.value.errors == [
        f"{tmp_path / 'missing.txt'}:1:1: classes.p.prefixes_file: cannot read: "
        "No such file or directory",
        f"{tmp_path / 'bin.txt'}:2:3: classes.q.prefixes_file: not UTF-8 text (byte 0xff)",
        f"{tmp_path / 'big.txt'}:1:1: classes.r.prefixes_file: 150 bytes, more than the 100 "
        "a prefixes_file may have (set POLICER_PREFIXES_MAX_BYTES to allow more)",
    ]


@pytest.mark.parametrize(("value", "error"), [
    ("''", "4:22: classes.p.prefixes_file: not a file name: ''"),
    ("[a]", "4:22: classes.p.prefixes_file: expected a string, got a list"),
    ("null", "4:22: classes.p.prefixes_file: expected a string, got nothing"),
])
def test_a_prefixes_file_value_must_name_a_file(value: str, error: str) -> None:
    assert errors_of(HEAD + f"classes:\n  p: {{prefixes_file: {value}}}\n") == \
        [f"p.yaml:{error}"]


def test_an_empty_prefixes_file_gives_a_class_with_no_prefixes(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "  p: {prefixes_file: p.txt}\n", {"p.txt": "# none yet\n"})
    assert load_policy(path).classes[0].prefixes == ()


def test_a_long_prefixes_file_matches_the_same_list_inline(tmp_path: Path) -> None:
    prefixes = long_list(30_000)
    path = write_policy(tmp_path, "  p: {prefixes_file: p.txt}\n  o: {default: true}\n",
                        {"p.txt": "\n".join(prefixes) + "\n"})
    from_file = load_policy(path)
    inline = parse_policy(HEAD + "classes:\n  p: {prefixes: [" + ", ".join(prefixes) + "]}\n"
                          "  o: {default: true}\n")
    assert from_file.classes == inline.classes


# ----------------------------------------------------------------------------- fuzz

#: pieces of policies: keys, values, YAML punctuation and some hostile characters
_PIECES = ["version: 1\n", "namespace: x\n", "classes:\n", "  a: {prefixes: [", "00", "0049",
           "]}\n", "profiles: {t: {}}\n", "limits: {t: {max: ", "}}\n", "[", "]", "{", "}",
           ": ", ", ", "- ", "\n", "  ", "&a ", "*a", "'", '"', "#", "\t", "\x00", "\ufeff",
           "%YAML 1.1\n", "---\n", "...\n", "? ", "|\n", ">\n", "1e9999", "~", "null",
           "true", "<<: *a\n", "prefixes_file: /nonexistent\n", "-1", "99999999999999999999",
           "0x1F", "1_000", ".inf", "12:30", "30d", "2020-13-45"]
#: explicit tags, which make the YAML constructor raise on a value it cannot build
_TAGS = ["!!python/object:os.system ", "!!binary ", "!!timestamp ", "!!int ", "!!float ",
         "!!bool ", "!!set ", "!!omap ", "!!str ", "!foo ", "!!null ", "!<tag:x> "]
_VALUE = re.compile(r"(?<=: )|(?<=\[)|(?<=, )")


@st.composite
def documents(draw: st.DrawFn) -> str:
    base = (POLICIES / draw(st.sampled_from(["example.yaml", "v2.yaml"]))).read_text()
    kind = draw(st.sampled_from(["pieces", "mutated", "mutated", "tagged", "text"]))
    if kind == "pieces":
        return "".join(draw(st.lists(st.sampled_from(_PIECES + _TAGS), max_size=40)))
    if kind == "text":
        return draw(st.text(alphabet=string.printable + "\x00\x85\u2028", max_size=300))
    if kind == "tagged":  # a tag or a piece in front of some values of a valid policy
        spots = [m.start() for m in _VALUE.finditer(base)]
        for at in sorted(draw(st.lists(st.sampled_from(spots), min_size=1, max_size=4)),
                         reverse=True):
            base = base[:at] + draw(st.sampled_from(_TAGS + _PIECES)) + base[at:]
        return base
    out = base
    for _ in range(draw(st.integers(1, 6))):  # insert, delete or replace a slice
        at = draw(st.integers(0, len(out)))
        end = min(len(out), at + draw(st.integers(0, 20)))
        out = out[:at] + draw(st.sampled_from([*_PIECES, *_TAGS, ""])) + out[end:]
    return out


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_fuzz_the_loader_gives_a_policy_or_a_placed_error(text: str) -> None:
    """Any text: a Policy, or a PolicyError whose every line has a place; never another
    exception (a few seconds: 1000 documents of at most a few KB)."""
    try:
        policy = parse_policy(text, "f.yaml")
    except PolicyError as e:
        assert e.errors
        for line in e.errors:
            source, line_no, col, rest = line.split(":", 3)
            assert source == "f.yaml" or source.endswith("nonexistent"), line
            assert int(line_no) >= 1 and int(col) >= 1 and rest.startswith(" "), line
        return
    assert isinstance(policy, Policy)


def test_without_libyaml_the_python_loader_keeps_the_same_bounds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import policer.policy.load as load

    monkeypatch.setattr(load, "_CLoader", None)
    assert errors_of("a: " + "[" * 5000) == [
        f"p.yaml:1:{3 + MAX_DEPTH}: (syntax): collections nested more than {MAX_DEPTH} deep"]
    assert load_policy(POLICIES / "example.yaml").namespace == "example"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789_:.-+xbe", max_size=14) | st.text(max_size=8))
def test_the_short_way_for_digits_types_a_scalar_as_pyyaml_does(value: str) -> None:
    from yaml.nodes import ScalarNode

    from policer.policy.load import FastResolve

    class Fast(FastResolve, yaml.SafeLoader):
        pass

    fast, plain = Fast(""), yaml.SafeLoader("")
    for implicit in ((True, False), (False, True)):
        expected = plain.resolve(ScalarNode, value, implicit)  # type: ignore[no-untyped-call]
        assert fast.resolve(ScalarNode, value, implicit) == expected, value
