"""`tidegate loadtest SCENARIO.toml`: an open-loop load generator and its report."""
