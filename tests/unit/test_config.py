import pytest

from remus.config import Timing, check_interval, parse_addr, parse_duration
from remus.errors import ConfigError


@pytest.mark.parametrize("text,sec", [("25ms", 0.025), ("0.2s", 0.2), ("1", 1.0),
                                      ("500us", 0.0005), (" 50 ms ", 0.05), ("2m", 120.0)])
def test_parse_duration(text, sec):
    assert parse_duration(text) == pytest.approx(sec)


@pytest.mark.parametrize("text", ["", "fast", "10 parsecs", "-5ms", "ms"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_parse_addr():
    assert parse_addr("10.0.0.2", 7788) == ("10.0.0.2", 7788)
    assert parse_addr("10.0.0.2:9000", 7788) == ("10.0.0.2", 9000)
    assert parse_addr(":9000", 7788) == ("0.0.0.0", 9000)
    with pytest.raises(ConfigError):
        parse_addr("h:70000", 1)
    with pytest.raises(ConfigError):
        parse_addr("h:port", 1)


def test_default_timing_is_valid():
    Timing().validate()


def test_lease_must_be_shorter_than_takeover():
    with pytest.raises(ConfigError, match="lease"):
        Timing(lease=0.5, takeover_timeout=0.3).validate()


def test_heartbeat_must_fit_twice_in_lease():
    with pytest.raises(ConfigError, match="heartbeat"):
        Timing(heartbeat=0.15, lease=0.2).validate()


def test_interval_bounds():
    assert check_interval(0.025) == 0.025
    with pytest.raises(ConfigError):
        check_interval(0.001)
    with pytest.raises(ConfigError):
        check_interval(60)
