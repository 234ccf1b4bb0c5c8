"""The one compiled part of remus: remus.checkpoint._pagexor (see its source).

Everything else is in pyproject.toml. The extension is optional: without a C
compiler and Python's headers the install goes on, and the delta encoder uses
its numpy loops (same output, more CPU; `remus check` says which).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("remus.checkpoint._pagexor", ["remus/checkpoint/_pagexor.c"],
                             extra_compile_args=["-O2", "-Wall"],
                             optional=True)])
