"""k-fold training and evaluation of dermbatch bundles (``dermbatch train``, ``dermbatch evaluate``).

Imports the core (``dermbatch``); the core never imports this package at module level.
"""
