"""One module per ``audioclf`` subcommand. Each defines NAME, HELP, add_arguments, run.

Only the standard library may be imported at module level here: heavy packages are
imported inside ``run`` so that ``audioclf --help`` stays fast.
"""

COMMANDS = ["manifest", "train", "cv", "cv_merge", "evaluate", "predict", "bench"]
