"""Opt-in mypyc build of the HTTP hot path: the same typed modules compiled to C extensions.

Measured (python -m benchmarks.hotpath_micro): 6.5 -> 4.4 us of Python per keep-alive request;
the README's Performance section has the wrk figures. Everything else is in pyproject.toml;
this file only adds compiled modules when ZDLB_MYPYC=1 (`make native` does it in place):

    ZDLB_MYPYC=1 .venv/bin/python setup.py build_ext --inplace    # in place, for a checkout
    ZDLB_MYPYC=1 pip install --no-build-isolation .               # a wheel (needs mypy in the env)

Without ZDLB_MYPYC the package stays pure Python, as before.
"""

import os

from setuptools import setup

# What a request runs through (routing and header rules included), and the modules
# connection.py hands its rare paths to (calls between compiled modules are C calls). Not
# here: config/model.py (its frozen dataclasses would not unpickle compiled, and workers
# receive configs pickled), census.py and errors.py (mypyc refuses them).
HOT_PATH = [
    "zdlb/http/head.py",
    "zdlb/http/stream.py",
    "zdlb/http/chunked.py",
    "zdlb/http/rewrite.py",
    "zdlb/http/exchange.py",
    "zdlb/http/connection.py",
    "zdlb/http/upstream.py",
    "zdlb/http/pinning.py",
    "zdlb/http/answers.py",
    "zdlb/http/waiting.py",
    "zdlb/http/recovery.py",
    "zdlb/http/splicing.py",
    "zdlb/http/switch.py",
    "zdlb/http/handover.py",
    "zdlb/http/routing.py",
    "zdlb/http/headrules.py",
    "zdlb/balancer/pool.py",
    "zdlb/balancer/server.py",
    "zdlb/stats.py",
]

ext_modules = []
if os.environ.get("ZDLB_MYPYC") == "1":
    from mypyc.build import mypycify

    extra = [p for p in os.environ.get("ZDLB_MYPYC_EXTRA", "").split() if p]
    only = os.environ.get("ZDLB_MYPYC_ONLY", "").split()
    ext_modules = mypycify(only or HOT_PATH + extra, opt_level="3", group_name="zdlb.native")

setup(ext_modules=ext_modules)
