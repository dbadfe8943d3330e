"""The `mtcnn-jobs` subcommands: each a thin shell (flags, one call, one line) over a job; none imports another."""
