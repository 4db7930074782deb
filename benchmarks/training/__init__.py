"""Training: throughput against the notes' loop, time to accuracy, recipes at equal time, precision and
kernel choices, compile, a step's profile, a run's overhead. `python -m benchmarks.training.<name> --help`."""
