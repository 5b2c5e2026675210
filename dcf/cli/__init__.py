"""The ``dcf`` command: a thin shell over ``dcf.client``."""
