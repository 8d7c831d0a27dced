"""Sub-commands of the ``fromage-gill`` CLI, one module each (see ``fromage_gill/cli.py``)."""
