"""Studies as a library: typed records, the resumable results store and the searches.

`experiments/` holds the command-line wrappers (flags -> one config -> a call here).
"""
