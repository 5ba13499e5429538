import pytest

from schemas.sizes import format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("80M", 80_000_000), ("2M", 2_000_000), ("1.5B", 1_500_000_000), ("500K", 500_000),
    ("80000000", 80_000_000), ("80_000_000", 80_000_000), ("2m", 2_000_000), (" 12 ", 12),
    ("0.5K", 500), (7, 7),
])
def test_parse_size_accepts_counts_and_suffixes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,message", [
    ("", "cannot parse size ''"),
    ("80MB", "cannot parse size '80MB'"),
    ("1e6", "cannot parse size '1e6'"),
    ("-5", "cannot parse size '-5'"),
    ("abc", "cannot parse size 'abc'"),
    ("1.5", "size '1.5' is not a whole number of examples"),
    ("1.0001K", "size '1.0001K' is not a whole number of examples"),
    ("0", "size must be positive, got '0'"),
    ("0M", "size must be positive, got '0M'"),
    (True, "size must be a count"),
])
def test_parse_size_rejects_with_message(text, message):
    with pytest.raises(ValueError) as err:
        parse_size(text)
    assert message in str(err.value)


def test_format_size_round_trips():
    for n in (80_000_000, 1_500_000_000, 500_000, 12345):
        assert parse_size(format_size(n)) == n
    assert format_size(80_000_000) == "80M"
    assert format_size(1_500_000_000) == "1500M"
