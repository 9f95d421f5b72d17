"""The `rdnac` command line (click): compile, run, inspect, targets."""
