"""The ``finegrain`` command line."""
