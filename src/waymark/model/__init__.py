"""Pure data types of the hub and their validation: no I/O."""
