"""The one C extension; everything else is in pyproject.toml.

``_records`` turns pages of Scalekit's directory users, as they came off the wire, into the warehouse's records: the
hot loop of a full sync. It is optional: without a compiler the package installs all the same and uses the same
conversion in Python (``scim_pipeline/scalekit/records.py``).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("scim_pipeline.scalekit._records", ["scim_pipeline/scalekit/_records.c"], optional=True)])
