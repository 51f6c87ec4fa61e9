"""Prints the table of parity maxima observed during the run at the end of the session; under
pytest-xdist every worker hands its observations to the controller, which prints them all."""
import dataclasses

from parity_tests.report import OBSERVATIONS, Observation, table


def pytest_terminal_summary(terminalreporter):
    if not OBSERVATIONS:
        return
    terminalreporter.section("DVT parity: (reference, candidate) backends, observed maxima")
    for line in table():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        # plain str and bool only: the channel to the controller serialises no NumPy scalar
        workeroutput["parity_observations"] = [
            [str(value) for value in dataclasses.astuple(o)[:-1]] + [bool(o.ok)] for o in OBSERVATIONS
        ]


def pytest_testnodedown(node, error):
    OBSERVATIONS.extend(Observation(*row) for row in getattr(node, "workeroutput", {}).get("parity_observations", []))
