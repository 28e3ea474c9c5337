"""scim-pipeline: keep an application's users, memberships and roles in sync with its customers' directories."""

__version__ = "0.1.0"
