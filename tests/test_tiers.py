"""The collection-time tiering of tests/conftest.py: a test is ``e2e`` exactly when it (or a module helper it calls,
or a fixture it uses) starts a process; ``make test-fast`` relies on it to skip every CLI run."""

from __future__ import annotations

import subprocess

from .conftest import _starts_process, run_cli


def _helper_that_runs_the_cli():
    return run_cli("--help")


def _pure_helper(x):
    return x + 1


def test_direct_and_transitive_process_calls_are_seen():
    def direct():
        return run_cli("--version")

    def through_helper():
        return _helper_that_runs_the_cli()

    def in_a_lambda():
        return (lambda: subprocess.run(["true"]))()

    assert _starts_process(direct, set())
    assert _starts_process(through_helper, set())
    assert _starts_process(in_a_lambda, set())


def test_pure_code_is_unit():
    def pure():
        return _pure_helper(2) * sum(range(3))

    assert not _starts_process(pure, set())


def test_this_module_is_tiered(request):
    # this test starts nothing, so it must be unit; a CLI test in another module must be e2e
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("e2e") is None
