"""Builds walsvc's compiled twins when a C compiler is there: the codecs' (walsvc/_record_c.c) and the
writer's store of one batch (walsvc/_writer_c.c), which share walsvc/_c_core.h.

Everything else about the package is in pyproject.toml.  The extensions are optional: without a compiler the
install still succeeds and walsvc runs its pure-Python code (`walsvc --version` says which codec runs, and
`walsvc status` which path stores batches).
"""

from setuptools import Extension, setup

SHARED = ["walsvc/_c_core.h"]

setup(ext_modules=[Extension("walsvc._record_c", ["walsvc/_record_c.c"], depends=SHARED, optional=True,
                             extra_compile_args=["-O2"]),
                   Extension("walsvc._writer_c", ["walsvc/_writer_c.c"], depends=SHARED, optional=True,
                             extra_compile_args=["-O2"])])
