"""Set-up of the model-zoo tests.

* The torchvision shim is installed before anything imports torchvision (see
  ``tv_shim``: a CUDA torchvision wheel next to a CPU torch otherwise fails to
  import at all).
* ``zoo_packages``: a test whose model needs a package that is not installed is
  skipped, saying which and how to install it, unless ``QSEG_REQUIRE_ZOO=1`` is
  set: then it fails, so that CI, which installs the zoo, can never pass by
  skipping it.
* The capture path, layer counts and time of each model are collected and
  printed as a table at the end of the run.
"""

from __future__ import annotations

import os

import pytest

from zoo import tv_shim

tv_shim.install()

from zoo.catalog import Entry, missing  # noqa: E402  (after the shim, by design)

REQUIRE_ENV = "QSEG_REQUIRE_ZOO"

#: name -> {"capture": ..., "quantized": ..., "layers": ..., "seconds": ...}, filled by the tests
RESULTS: dict[str, dict[str, object]] = {}


def require_packages(entry: Entry) -> None:
    """Skip (or, with ``QSEG_REQUIRE_ZOO=1``, fail) when ``entry`` needs a package
    that is not installed."""
    absent = missing(entry)
    if not absent:
        return
    how = (
        "pip install --no-deps dynamic-network-architectures==0.4.4"
        if entry.family == "nnunet"
        else "pip install -e '.[zoo]'"
    )
    message = f"not installed: {', '.join(absent)} (the '{entry.family}' models of the zoo; {how})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message}; {REQUIRE_ENV}=1 makes a missing zoo package a failure", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def zoo_packages():
    """The check of :func:`require_packages`, as a fixture."""
    return require_packages


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    width = max(len(name) for name in RESULTS)
    terminalreporter.section("qseg model zoo")
    terminalreporter.write_line(
        f"{'model':{width}}  {'capture':26}  {'quantized':>9}  {'all-zero':>8}  {'seconds':>7}"
    )
    for name, r in RESULTS.items():
        counts = f"{r.get('quantized', '-')}/{r.get('layers', '-')}"
        seconds = r.get("seconds")
        secs = f"{seconds:7.1f}" if isinstance(seconds, float) else f"{'-':>7}"
        terminalreporter.write_line(
            f"{name:{width}}  {r.get('capture', '-')!s:26}  {counts:>9}  {r.get('zero', '-')!s:>8}  {secs}"
        )
