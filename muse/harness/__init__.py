"""The pytest harness: the plugin, the cases it parametrizes, the results file, the summary and
the comparison of two runs."""
