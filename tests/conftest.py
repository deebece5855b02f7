"""Shared fixtures live in tests/fixtures/; each module is a pytest plugin listed here."""

pytest_plugins = [
    "tests.fixtures.daemon",
    "tests.fixtures.api",
    "tests.fixtures.mosquitto",
    "tests.fixtures.relay",
    "tests.fixtures.rabbitmq",
    "tests.fixtures.storage",
    "tests.fixtures.tinyproxy",
    "tests.fixtures.sync",
]
