"""The package version, in a module of its own so that submodules can read it without importing
`faqd_tf` (keep equal to `version` in pyproject.toml)."""

__version__ = "0.1.0"
