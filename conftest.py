"""Project fixtures only: the harness itself (options, parametrization, `record`, summary) is
muse's pytest plugin, loaded through its `pytest11` entry point once muse is installed."""
