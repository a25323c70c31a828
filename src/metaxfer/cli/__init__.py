"""The ``metaxfer`` command line."""
