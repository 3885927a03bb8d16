"""Command-line interface (`kvbound ...`): app.py holds the commands, options.py the flags they share."""
