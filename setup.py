"""Builds the record codec's compiled twin (walsvc/_record_c.c) when a C compiler is there.

Everything else about the package is in pyproject.toml.  The extension is optional: without a compiler the
install still succeeds and walsvc runs its pure-Python codec (walsvc.record.implementation() says which).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("walsvc._record_c", ["walsvc/_record_c.c"], optional=True,
                             extra_compile_args=["-O2"])])
