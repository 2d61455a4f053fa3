"""The ``edit`` and ``scenes`` commands: place, train, evaluate and report, from the command line."""
