"""Generated test corpora shared by several suites."""
