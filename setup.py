"""The one C extension; everything else is in pyproject.toml.

``_struct_json`` turns a user's SCIM detail (a protobuf Struct) into JSON, the hot loop of a full sync. It is
optional: without a compiler the package installs all the same and uses the same conversion in Python
(``scim_pipeline/struct_json.py``).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("scim_pipeline._struct_json", ["scim_pipeline/_struct_json.c"], optional=True)])
