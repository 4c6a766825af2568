"""The gateway overhead benchmark: direct vs nginx vs the fleet gateway, in one run.

`make bench` (or `python -m bench`) starts a lean vLLM look-alike upstream, puts nothing,
nginx (the vhost `fleet nginx` renders) and the fleet gateway (`fleet up`) in front of it
in turn, drives the same scenarios at each, and writes `bench/results/latest.md` and
`bench/results/latest.png`. `python -m bench --quick` is the CI smoke version.
"""
