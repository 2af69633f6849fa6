"""
The project's tests: C{tests.unit} in memory, C{tests.integration} with real processes, and what
both share in C{tests.support}.
"""

from hypothesis import settings

# One hypothesis profile for the whole suite: the same examples on every run and every machine
# (a failure seen in CI is the failure seen here), no example database left behind, and no
# deadline, since the machines that run the suite are shared and their timing means nothing.
settings.register_profile("tabbyproxy", derandomize=True, database=None, deadline=None, max_examples=200)
settings.load_profile("tabbyproxy")
