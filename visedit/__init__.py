"""The toolkit's front door: the ``visedit`` command line (`visedit.cli`)."""
