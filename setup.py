"""Build script: the Python package plus the optional native extension ``addax_kernels._C``."""

from setuptools import setup

setup()
