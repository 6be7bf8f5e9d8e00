"""Channel providers: each sends one rendered message over one protocol (see :mod:`.base`)."""
