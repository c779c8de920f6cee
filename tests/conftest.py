"""Shared pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "pypto: runs pypto kernels (SIM cost model + CPU interpreter); the first "
        "use builds pypto's interpreter into .cache/pypto (~1 min once)")
