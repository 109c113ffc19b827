"""The one home of the helpers several i2x modules share.

Nothing here is public API: the modules of the package import these names, users do not. Each
module has one job, and only torch, safetensors and the standard library are imported here, so
every layer above can use them (``docs/architecture.md``).
"""
