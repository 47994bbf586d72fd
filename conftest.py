"""Project fixtures only. The harness itself (options, parametrization, `record`, summary) is
muse's pytest plugin, which installing muse does not load anywhere: this project asks for it
here, as any project that wants its fixtures does."""

pytest_plugins = ["muse.harness.plugin"]
