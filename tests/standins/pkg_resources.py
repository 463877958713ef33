"""The one pkg_resources name that the official `elatentlpips` package imports
(`parse_version`), for machines whose setuptools no longer ships pkg_resources."""
from packaging.version import parse as parse_version  # noqa: F401
