"""The one exception the argument layer raises."""


class ArgumentError(ValueError):
    """A bad command line, config file or environment variable.

    The message always names the argument (``--name``), and for config files the file, so the
    CLI can print it as ``megatron <cmd>: error: <message>`` without a traceback.
    """
