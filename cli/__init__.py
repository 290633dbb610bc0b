"""The command line: parsing, printing, progress. No logic; heavy modules are imported only when a command runs."""
