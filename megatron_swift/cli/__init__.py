"""The ``megatron`` command line (``megatron_swift.cli.main:main``)."""
