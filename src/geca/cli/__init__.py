"""The `geca` command line: one module per command group; library work is imported inside each command, so that
`geca --help` starts without torch."""
