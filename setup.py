"""All metadata lives in setup.cfg; this file only lets `pip install -e .` work with old tooling."""
from setuptools import setup

setup()
