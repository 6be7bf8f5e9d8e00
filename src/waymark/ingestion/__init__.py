"""Sources of data for the hub: HTTP payloads and files turned into native records."""
