"""Development tools for engagement-agent: not part of what devices install.

The Debian package ships only `agent`; this package (the Engagement API stand-in) is installed
by `pip install .` for developers and used by the test suite and the benchmarks.
"""
