"""Prints the table of parity maxima observed during the run at the end of the session."""
from parity_tests.report import OBSERVATIONS, table


def pytest_terminal_summary(terminalreporter):
    if not OBSERVATIONS:
        return
    terminalreporter.section("DVT parity: PyTorch vs MindSpore, observed maxima")
    for line in table():
        terminalreporter.write_line(line)
