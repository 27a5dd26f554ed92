"""Settings: flags over TASKWHEEL_* variables over defaults, with clear errors."""
import argparse

import pytest

from taskwheel import config


def parse(argv, env=None):
    parser = argparse.ArgumentParser()
    config.add_config_flags(parser)
    return config.from_args(parser.parse_args(argv), env=env or {})


def test_defaults_suit_the_embedded_mode():
    cfg = parse([])
    assert cfg.listen == "127.0.0.1:7070"
    assert cfg.store_url().endswith("tasks.db")


def test_an_environment_variable_sets_a_field_and_a_flag_beats_it():
    assert parse([], {"TASKWHEEL_LOOKAHEAD_MS": "9000"}).lookahead_ms == 9000
    assert parse(["--lookahead-ms", "7000"], {"TASKWHEEL_LOOKAHEAD_MS": "9000"}).lookahead_ms == 7000


def test_limits_are_settings_too():
    assert parse(["--max-batch", "50"]).limits.max_batch == 50
    assert parse([], {"TASKWHEEL_MAX_PAYLOAD_BYTES": "10"}).limits.max_payload_bytes == 10


def test_a_non_numeric_variable_is_named_in_the_error():
    with pytest.raises(ValueError, match="TASKWHEEL_SHARDS"):
        parse([], {"TASKWHEEL_SHARDS": "many"})


@pytest.mark.parametrize("argv, message", [
    (["--shards", "-1"], "--shards"),
    (["--slice-ms", "3000", "--lookahead-ms", "5000"], "--slice-ms"),
    (["--max-batch", "0"], "--max-batch"),
    (["--lease-write-delay-ms", "-1"], "--lease-write-delay-ms"),
    (["--transition-linger-ms", "-5"], "--transition-linger-ms"),
])
def test_bad_values_are_refused_naming_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_every_setting_is_documented_with_flag_env_and_default():
    rows = config.documented()
    flags = {flag for flag, _, _ in rows}
    assert {"--listen", "--lookahead-ms", "--max-batch", "--hold-ms"} <= flags
    assert all(env.startswith("TASKWHEEL_") for _, env, _ in rows)


def test_a_lease_write_delay_longer_than_the_shortest_lease_is_accepted():
    # Each delivery's lease is written by half its lease at the latest (see dispatch).
    config = parse(["--lease-write-delay-ms", "1000", "--min-lease-ms", "100"])
    assert (config.lease_write_delay_ms, config.limits.min_lease_ms) == (1000, 100)
