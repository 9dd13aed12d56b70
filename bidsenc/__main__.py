from .cli.run import entry_point

entry_point()
