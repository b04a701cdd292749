"""Times, names and state documents read without the re and json modules' full machinery
read as their patterns and json.loads do.
"""
import json
import re

import pytest

from conftest import sk


# ---------------------------------------------------------------- times and names without re

_ISO_REFERENCE = r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?" \
                 r"(Z|[+-]\d{2}:?\d{2})?)?\Z"


def test_parse_iso_and_names_read_as_their_patterns_do():
    """The login line imports no re: parse_iso, parse_date and valid_name check by hand what
    these patterns say (ASCII digits), on every form and near-miss generated here."""
    import itertools
    import random
    import re
    ref = re.compile(_ISO_REFERENCE)
    rng = random.Random(7)
    pieces = ["2026-08-01", "2026-8-01", "20260801", "2026-02-30", "0000-01-01", "T", " ",
              "t", "03:00", "3:00", "03:00:07", "03:00:7", ":07", ".5", ".", ".123456", "Z",
              "z", "+02:00", "-0530", "+2", "+02:0", "\n", "x", ""]
    seen = 0
    for n in (1, 2, 3, 4, 5):
        for combo in itertools.islice(itertools.product(pieces, repeat=n), 4000):
            text = "".join(combo)
            m = ref.match(text)
            assert (sk._iso_parts(text) is not None) == bool(m), repr(text)
            if m:
                assert sk._iso_parts(text) == m.groups(), repr(text)
            seen += 1
    assert seen > 10000
    for text in ("2026-08-01T03:00:00Z", "2026-08-01", "2026-08-01 03:00+02:00"):
        assert sk.parse_iso(text) is not None
    assert sk.parse_date("2026-02-29") is None and sk.parse_date("2028-02-29") is not None
    assert sk.parse_date("2026-08-01T00") is None and sk.parse_date(None) is None
    name = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
    alphabet = "aZ09._-é \n/"
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.choice((0, 1, 2, 5, 64, 65))))
        assert sk.valid_name(text) == bool(name.match(text)), repr(text)


def test_the_state_reader_reads_as_json_loads_does():
    """_json_loads uses json's C scanner (no json package, no re at login): the same
    documents, the same refusals."""
    import json
    good = ['{"a": [1, 2.5, -3e2, "x\\u00e9\\n", null, true, false, {}]}', '  [ ]  \n',
            '"s"', '{"n": NaN, "i": -Infinity}', '{"k": {"k": {"k": []}}}', "0", "1.0"]
    bad = ["", "  ", "{", "[1,]", "{'a': 1}", "[1] [2]", "nul", "{\"a\" 1}", "\ufeff{}",
           "[1]\x00"]
    for text in good:
        assert repr(sk._json_loads(text.encode())) == repr(json.loads(text)), text
    for text in bad:
        with pytest.raises(ValueError):
            json.loads(text)
        with pytest.raises(ValueError):
            sk._json_loads(text.encode())
    with pytest.raises(ValueError):
        sk._json_loads(b"[" * 100000)
